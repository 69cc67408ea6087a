"""``locdiff train`` and ``locdiff config``: settings from the defaults (or, with
``--resume``, the run's own), a TOML file, the common flags and ``--set``, in that order;
every setting checked before anything is read or written."""
from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
from pathlib import Path

from locdiff import config as C
from locdiff import distributed
from locdiff.cli_common import CliError, add_dist_timeout, join_process_group, require_packages
from locdiff.data.files import DataError, load_pair, read_coords
from locdiff.ranges import SettingError

# Flags for the common settings: argparse destination -> setting.
FLAG_SETTINGS = {
    "embeddings": "data.embeddings", "coords": "data.coords", "val_embeddings": "data.val_embeddings",
    "val_coords": "data.val_coords", "degree": "model.degree", "steps": "train.steps",
    "max_minutes": "train.max_minutes", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "accumulate": "train.accumulate", "workers": "data.workers", "tensorboard": "train.tensorboard",
}


def _set(obj, key: str, value):
    head, _, rest = key.partition(".")
    sub = getattr(obj, head)
    return dataclasses.replace(obj, **{head: _set(sub, rest, value) if rest else value})


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _keys(data: dict) -> list[str]:
    """``section.name`` of each setting in a settings table."""
    return [f"{k}.{n}" for k, v in data.items() if isinstance(v, dict) for n in v] + \
        [k for k, v in data.items() if not isinstance(v, dict)]


def _run_config_text(out: Path) -> tuple[str | None, bool]:
    """For ``--resume``: rank 0 reads the run's config.json (the run folder is rank 0's) and
    every rank gets it, or learns that the folder is a run killed before it wrote anything
    (only its lock and temporaries: True), or raises the same error as rank 0."""
    from locdiff.run import CONFIG_FILE
    from locdiff.runfolder import LOCK_FILE, entries_besides_lock
    from locdiff.resume import check_resumable

    data = None
    if distributed.is_main():
        if not (out / CONFIG_FILE).is_file() and (out / LOCK_FILE).exists() and not entries_besides_lock(out):
            data = b"S"
        else:
            try:
                check_resumable(out)
                data = b"C" + (out / CONFIG_FILE).read_text(encoding="utf-8", errors="replace").encode()
            except DataError as err:  # every rank says it, not only rank 0
                data = b"E" + str(err).encode()
    data = distributed.broadcast_bytes(data)
    if data[:1] == b"E":
        raise DataError(data[1:].decode())
    return (data[1:].decode() or None) if data[:1] == b"C" else None, data == b"S"


def resolve_settings(args, resume_base: str | None = None):
    """``(RunConfig, origin)``: the settings, and for each setting given, where it came from
    (``--degree``, ``--set key=value`` as typed, or the TOML file's name) for error messages."""
    import json

    from locdiff.run import CONFIG_FILE, TOML_VERSION, RunConfig, config_from_raw

    origin: dict[str, str] = {}
    cfg = RunConfig()
    if resume_base:
        source = str(Path(args.out) / CONFIG_FILE)
        try:
            raw = json.loads(resume_base)
        except ValueError as err:
            raise DataError(f"{source}: invalid JSON ({err})") from None
        cfg = config_from_raw(raw, source)
    if args.config:
        data = C.read_toml(args.config, version=TOML_VERSION)
        merged = C.to_dict(cfg)
        for section, values in data.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section].update(values)
            else:
                merged[section] = values
        cfg = C.from_dict(RunConfig, merged, source=str(args.config))
        origin.update({k: str(args.config) for k in _keys(data)})
    for dest, key in FLAG_SETTINGS.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if dest in ("embeddings", "coords", "val_embeddings", "val_coords"):
            value = str(Path(value).expanduser().absolute())
        try:
            cfg = _set(cfg, key, value)
        except SettingError as err:  # a config's own range check, worded as _check words it
            raise CliError(f"{_flag(dest)} {err.value}: expected {err.expected}") from None
        origin[key] = _flag(dest)
    if getattr(args, "unconditional", None):
        cfg = _set(cfg, "model.conditional", False)
        origin["model.conditional"] = "--unconditional"
    cfg = C.apply_overrides(cfg, args.set or [])
    # A --set's origin is the flag as typed: messages echo "train.lr=0", not the parsed 0.0.
    origin.update({item.partition("=")[0].strip(): f"--set {item.strip()}" for item in args.set or []})
    return cfg, origin


def _check(cfg, origin: dict, device, world: int) -> None:
    from locdiff.settings import validate

    try:
        validate(cfg)  # types and ranges first: the memory bound below divides by them
        validate(cfg, device=device, rows_per_call=max(1, cfg.train.batch_size // (world * cfg.train.accumulate)))
        pieces = world * cfg.train.accumulate
        if cfg.train.batch_size % pieces:
            raise SettingError("train.batch_size", cfg.train.batch_size, f"a multiple of the world size {world} "
                               f"(processes over all nodes) x train.accumulate {cfg.train.accumulate} = {pieces}")
    except SettingError as err:
        where = origin.get(err.key)
        if where and where.startswith("--set "):
            raise CliError(f"{where}: expected {err.expected}") from None
        if where and where.startswith("--"):
            raise CliError(f"{where} {err.value}: expected {err.expected}") from None
        raise CliError(f"{where + ': ' if where else ''}{err.key} = {err.value!r}: expected {err.expected}") from None


def _check_derived(cfg, origin: dict, emb_dim: int) -> None:
    """Settings that follow from others (the data's width, diffusion.timesteps): asked for with
    ``--set`` at another value, an error rather than replaced without a word. (Config files
    carry them as written by ``locdiff config``, and are reused on other data: there they
    follow silently.)"""
    for key, value, follows in (("model.emb_dim", emb_dim, f"the embeddings' width ({emb_dim})"),
                                ("model.timesteps", cfg.diffusion.timesteps,
                                 f"diffusion.timesteps ({cfg.diffusion.timesteps})")):
        given = getattr(cfg.model, key.partition(".")[2])
        if origin.get(key, "").startswith("--set ") and given != value:
            raise CliError(f"{origin[key]}: this setting follows {follows}; leave it out")


def _check_data_flags(cfg, origin: dict) -> None:
    """The data a run needs: embeddings and coordinates, or for an unconditional run
    (``--unconditional``, model.conditional = false) coordinates alone."""
    d = cfg.data
    if cfg.model.conditional:
        if not d.embeddings or not d.coords:
            raise CliError("--embeddings and --coords are needed (or data.embeddings and data.coords in --config; "
                           "--unconditional trains on --coords alone)")
        if bool(d.val_embeddings) != bool(d.val_coords):
            raise CliError("--val-embeddings and --val-coords go together")
        return
    where = origin.get("model.conditional", "")
    how = where if where.startswith("--") else f"model.conditional = false{f' in {where}' if where else ''}"
    for flag, key in (("--embeddings", "data.embeddings"), ("--val-embeddings", "data.val_embeddings")):
        path, source = getattr(d, key.partition(".")[2]), origin.get(key, "")
        if not path:
            continue
        if not source:  # the run's own, on --resume: it was trained on embeddings
            raise CliError(f"{how}: the run was trained on embeddings ({key} = {path}); --resume cannot make it "
                           "unconditional: train into a new --out")
        named = flag if source.startswith("--") else f"{key} in {source}"
        raise CliError(f"{named}: {how} trains a model of where the coordinates lie, without embeddings; leave "
                       f"out {named}" + (f" or {where}" if where.startswith("--") else ""))
    if not d.coords:
        raise CliError(f"--coords is needed ({how} trains on coordinates alone)")


def cmd_train(args) -> int:
    from locdiff.encoder import record_encoder
    from locdiff.devices import resolve_device
    from locdiff.runfolder import check_run_folder
    from locdiff.train import train

    dev = resolve_device(args.device)
    # The process group first: under torchrun every rank checks the same settings.
    join_process_group(args, dev)
    out = Path(args.out)
    check_run_folder(out)
    base, started = _run_config_text(out) if args.resume else (None, False)  # (a collective: every rank)
    if started:  # killed before it saved anything: a requeued --resume starts it at step 0
        if distributed.is_main():
            print(f"locdiff train: note: {out} holds no config.json or checkpoint yet (a run stopped before it "
                  "saved anything); starting at step 0", file=sys.stderr)
        args.resume = False
    cfg, origin = resolve_settings(args, base)
    _check(cfg, origin, dev, distributed.world_size())
    if cfg.train.tensorboard:
        require_packages("--tensorboard")
    d = cfg.data
    _check_data_flags(cfg, origin)
    note = None if args.quiet or not distributed.is_main() else \
        (lambda msg: print(f"locdiff train: {msg}", file=sys.stderr, flush=True))
    val = None
    if cfg.model.conditional:
        emb, coords = load_pair(d.embeddings, d.coords, log=note)
        if d.val_embeddings:
            val = load_pair(d.val_embeddings, d.val_coords, log=note)
            if val[0].shape[1] != emb.shape[1]:
                raise DataError(f"{d.val_embeddings}: embedding dimension {val[0].shape[1]}, but the training "
                                f"embeddings have {emb.shape[1]}")
            val = (val[0][:], val[1])
    else:  # where the coordinates lie, given nothing
        emb, coords = None, read_coords(d.coords)
        val = (None, read_coords(d.val_coords)) if d.val_coords else None
        for path, rows in ((d.coords, coords), (d.val_coords, val[1] if val else None)):
            if rows is not None and not len(rows):
                raise DataError(f"{path}: coordinates file has no rows")
    _check_derived(cfg, origin, emb.shape[1] if emb is not None else 1)
    command = "locdiff " + shlex.join(getattr(args, "argv", []) or ["train"])
    res = train(emb, coords, out, cfg, resume=args.resume, device=args.device, val=val, progress=not args.quiet,
                extra_config={"command": command}, check_data=False)  # load_pair has checked both files
    if not distributed.is_main():
        return 128 + res.signal if res.signal else 0
    if res.signal:
        name = signal.Signals(res.signal).name
        print(f"locdiff train: stopped by {name} at step {res.steps} of {cfg.train.steps}; checkpoint saved in "
              f"{out}; continue with: locdiff train --out {out} --resume", file=sys.stderr)
        return 128 + res.signal
    if res.nothing_to_do:
        print(f"{out}: {res.nothing_to_do}; the run is unchanged")
        return 0
    if d.embeddings and record_encoder(d.embeddings, out):
        print(f"recorded the image encoder of {d.embeddings} in {out}")
    best = "" if not res.best else f"; best validation NLL {res.best['nll']:.3f} at step {res.best['step']}" \
        if "nll" in res.best else f"; best validation median {res.best['median_km']:.0f} km at step {res.best['step']}"
    if res.samples_per_s > 0:
        print(f"trained {res.steps} steps in {res.elapsed_s / 60:.1f} min ({res.samples_per_s:.0f} samples/s{best}); "
              f"run saved in {out}")
    else:  # a resume that only had the final validation and calibration left
        print(f"completed the run at step {res.steps}: final validation and calibration{best}; run saved in {out}")
    if res.skipped_steps:
        print(f"note: {res.skipped_steps} steps were skipped for a non-finite or spiking loss (metrics.jsonl)")
    if res.time_up:
        print(f"note: stopped at step {res.steps} of {cfg.train.steps}: train.max_minutes = "
              f"{cfg.train.max_minutes:g} bounds the training time of all resumes together; to train on: "
              f"locdiff train --out {out} --resume --max-minutes MORE")
    return 0


def cmd_config(args) -> int:
    from locdiff.run import TOML_VERSION, RunConfig, read_config

    if args.run:
        cfg, _ = read_config(args.run)
        header = f"The settings of the run {args.run}."
    else:
        cfg, header = RunConfig(), "Every setting of locdiff train, at its default. Edit, then: locdiff train --config FILE"
    sys.stdout.write(C.dumps(cfg, version=TOML_VERSION, header=header))
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a CS-UNet on (embedding, lat, lon) files (torchrun for several processes)")
    t.add_argument("--embeddings", default=None, help=".npy (N, D) or folder of .npy shards (data.embeddings)")
    t.add_argument("--coords", default=None, help="CSV with lat, lon columns or .npy (N, 2) (data.coords)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--config", default=None, help="TOML settings file (locdiff config --defaults writes one)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=3e-4 (repeatable; after the flags)")
    t.add_argument("--degree", type=C.integer, default=None, help="SHDD degree L (model.degree, default 32)")
    t.add_argument("--steps", type=C.integer, default=None, help="optimizer steps (train.steps, default 20000)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this time")
    t.add_argument("--batch-size", type=C.integer, default=None, help="global batch: rows a step over all processes")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (train.lr)")
    t.add_argument("--seed", type=C.integer, default=None, help="seed of the initialisation, order and noise")
    t.add_argument("--accumulate", type=C.integer, default=None, help="pieces each process cuts its rows into")
    t.add_argument("--workers", type=C.integer, default=None, help="loader processes (default 2 for files)")
    t.add_argument("--unconditional", action="store_true", default=None,
                   help="no embeddings: a model of where the --coords lie (model.conditional = false)")
    t.add_argument("--val-embeddings", default=None, help="validation embeddings (else rows are held out)")
    t.add_argument("--val-coords", default=None, help="validation coordinates")
    t.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard event files")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint, with its settings")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dist_timeout(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print settings as TOML: the defaults, or a run's")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--defaults", action="store_true", help="every setting at its default")
    g.add_argument("--run", default=None, help="the settings of a run folder")
    c.set_defaults(func=cmd_config)
