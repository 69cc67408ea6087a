"""What a run starts from: a new run's folder must hold no trained run and none of the
user's own files; a resumed run (``--resume``) keeps its network, objective and sampling
settings, its training data (checked against config.json's record of it) and its noise
schedule, and goes on from its checkpoint's state
(docs/cli.md, "Resuming, time budgets and divergence")."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from locdiff.data.files import DataError, gather_rows, not_a_file
from locdiff.optim import lr_factor
from locdiff.predict import SAMPLING
from locdiff.run import (CHECKPOINT_FILE, CONFIG_FILE, RunConfig, TrainConfig, check_schedule, finished_step,
                         parse_checkpoint, read_checkpoint_bytes, read_config, saved_checkpoints)


# config.json's record of the training data: the held-out rows and the data order follow
# from it, so a resume on other data would validate on rows it had trained on.
DATA_KEY = "training_data"


def data_fingerprint(embeddings, coords) -> dict:
    """Rows and a SHA-256 of all coordinates and of 1,024 evenly spaced embedding rows (a
    reordered, edited or shortened file changes it; reading the sample is cheap at any size)."""
    n = len(coords)
    h = hashlib.sha256(np.ascontiguousarray(coords, np.float64).tobytes())
    idx = np.unique(np.linspace(0, n - 1, min(n, 1024)).astype(np.int64))
    h.update(np.ascontiguousarray(gather_rows(embeddings, idx), np.float32).tobytes())
    return {"rows": int(n), "sha256": h.hexdigest()}


# Settings a resumed run keeps: the network, the objective, and the prediction settings that
# training does not calibrate (calibrated ones are set again at the end of the resumed run).
KEPT_ON_RESUME = {"model": None, "diffusion": None,
                  "predict": (*SAMPLING, "batch_size"),
                  "train": ("seed", "val_size")}  # which rows are held out for validation


def _resume_differences(old: RunConfig, new: RunConfig) -> list[str]:
    out = []
    for section, names in KEPT_ON_RESUME.items():
        a, b = getattr(old, section), getattr(new, section)
        a, b = (a.to_dict(), b.to_dict()) if section == "model" else (asdict(a), asdict(b))
        out += [f"{section}.{k}: the run has {a[k]!r}, this command {b.get(k)!r}"
                for k in (names or a) if a[k] != b.get(k)]
    return out


def check_resumable(run_dir) -> None:
    """DataError unless ``run_dir`` holds what ``--resume`` needs to start: its config.json
    (the checkpoint may not exist yet: a run stopped before its first)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        if (run_dir / CHECKPOINT_FILE).is_file():
            raise DataError(f"{run_dir / CONFIG_FILE}: not found, so the checkpoint beside it cannot be resumed (its "
                            "settings are unknown); restore config.json or train into a new --out")
        raise DataError(f"{run_dir}: nothing to resume (no config.json or checkpoint); leave out --resume to start")


def prepare_folder(run_dir: Path, config: RunConfig, resume: bool, emb_dim: int, data: dict,
                    log) -> tuple[RunConfig, bytes | None, dict | None, bool]:
    """Rank 0: the config to train with, the checkpoint bytes to resume from (None: step 0),
    when there is nothing left to train why and the checkpoint's training state (None: there
    is), and whether config.json may record ``data`` as the run's (not for a run whose data
    an earlier locdiff left unrecorded); every check done before anything is written."""
    from locdiff.runfolder import run_files

    cfg_path, ckpt_path = run_dir / CONFIG_FILE, run_dir / CHECKPOINT_FILE
    for path in run_files(run_dir):
        what = not_a_file(path)
        if what is not None:
            raise DataError(f"{path}: {what}, not a regular file, where the run keeps its own file; move it away, "
                            "or train into a new --out")
    has_cfg, has_ckpt = cfg_path.is_file(), ckpt_path.is_file()
    kept = saved_checkpoints(run_dir)  # the latest, kept and best ones
    if not resume:
        if kept:  # a new run would remove them (kept and best ones too, with no checkpoint.safetensors)
            raise DataError(f"{run_dir}: already holds a trained run ({', '.join(kept)}); continue it with "
                            "--resume or choose a new --out")
        _check_not_foreign(run_dir, has_cfg)
        return config, None, None, True
    check_resumable(run_dir)
    old, raw = read_config(run_dir)
    diffs = _resume_differences(old, config)
    if diffs:
        raise DataError(f"{cfg_path}: --resume with other settings than the run's ({'; '.join(diffs)}); a resumed "
                        "run changes only train and data settings: resume with the run's others or train into "
                        "a new --out")
    if raw.get("embedding_dim", emb_dim) != emb_dim:
        raise DataError(f"{cfg_path}: the run was trained on {raw['embedding_dim']}-dimensional embeddings, "
                        f"these have {emb_dim}")
    held = raw.get(DATA_KEY)
    if isinstance(held, dict) and held != data:
        what = (f"{held.get('rows')} rows then, {data['rows']} now" if held.get("rows") != data["rows"] else
                "as many rows, with other values or in another order")
        raise DataError(f"{cfg_path}: --resume on other training data than the run's ({what}): the held-out "
                        "rows and the order of the data follow from them; resume with the run's files, or train "
                        "into a new --out")
    config = RunConfig(old.model, old.diffusion, config.train, old.predict, config.data)
    if not has_ckpt:
        if kept:  # starting at step 0 would remove them: the user must choose
            raise DataError(f"{ckpt_path}: not found, but {', '.join(kept)} are there; copy the one to go on from "
                            f"to {CHECKPOINT_FILE} and --resume, or train into a new --out")
        log(f"{run_dir}: no checkpoint yet (stopped before its first); starting at step 0 with its settings")
        return config, None, None, True  # (from step 0: the data it trains on is this)
    ckpt_bytes = read_checkpoint_bytes(ckpt_path)
    tensors, meta = parse_checkpoint(ckpt_bytes, ckpt_path)  # damaged: refused before config.json is rewritten
    check_schedule(tensors, ckpt_path, config)  # (before the notes below: a refused resume tells nothing else)
    if held is None:
        log(f"note: {cfg_path} does not record the run's training data (an earlier locdiff made it): this "
            "resume cannot check that these are the files the run trained on, and records none")
    state = json.loads(meta.get("state", "{}"))
    why = _nothing_left(state, config.train, finished_step(raw, state))
    done = None if why is None else {"why": why, **{k: state.get(k) for k in ("step", "elapsed_s", "history",
                                                                            "skipped", "best")}}
    step = int(state.get("step", 0))
    if (done is None and old.train.steps != config.train.steps and step >= config.train.warmup_steps
            and old.train.max_minutes is None and config.train.max_minutes is None):
        before = lr_factor(step, step / old.train.steps, old.train) * old.train.lr
        after = lr_factor(step, step / config.train.steps, config.train) * config.train.lr
        log(f"note: train.steps {old.train.steps} -> {config.train.steps}: the learning-rate schedule now spans "
            f"{config.train.steps} steps, and at step {step} the rate goes from {before:.3g} to {after:.3g}")
    return config, ckpt_bytes, done, held is not None


def _nothing_left(state: dict, tc: TrainConfig, finished) -> str | None:
    """Why a checkpoint with this training state has no step left under ``tc``, or None
    (also when the run stopped before its final validation and calibration completed)."""
    step, spent = int(state.get("step", 0)), float(state.get("elapsed_s", 0.0))
    if finished != step:
        return None
    if step >= tc.steps:
        return f"the run is at step {step} and train.steps is {tc.steps}: nothing to train (raise --steps to go on)"
    if tc.max_minutes and spent >= 60 * tc.max_minutes:
        return (f"the run has trained {spent / 60:.2f} min, and train.max_minutes = {tc.max_minutes:g} bounds the "
                f"training time of all its resumes together: nothing to train (raise --max-minutes to go on)")
    return None


def _check_not_foreign(run_dir: Path, has_cfg: bool) -> None:
    """A new run may reuse a run's folder (one stopped before its first checkpoint), never
    overwrite a folder of the user's own files. A run writes config.json first: without it,
    files named as a run's (a train.toml to train from, say) are the user's."""
    from locdiff.runfolder import entries_besides_lock, foreign_entries

    foreign = foreign_entries(run_dir) if has_cfg else entries_besides_lock(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{run_dir}: holds files that no locdiff run writes ({shown}); train into an empty or "
                        "new --out")
    if has_cfg:
        try:
            read_config(run_dir)
        except DataError as err:
            raise DataError(f"{run_dir / CONFIG_FILE}: not a locdiff run's config ({err}); train into an empty or "
                            "new --out") from None
