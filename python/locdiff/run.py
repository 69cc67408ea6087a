"""Run folders: the run's settings (:class:`RunConfig`), config.json and checkpoint I/O, and
loading a trained model.

A run folder holds ``config.json`` (model, diffusion, training, data and prediction
settings) and ``checkpoint.safetensors`` (weights, EMA weights, optimizer state; the training
state and a SHA-256 of the tensors as JSON metadata). Both are written to a temporary file
and renamed with ``os.replace``, so a killed run leaves the previous checkpoint intact.
Reading checks the config's schema, the checkpoint's checksum, its shapes against the
config and that its weights are finite; each failure is one :class:`DataError` line.
Nothing is ever unpickled. The rest of a run folder (lock, kept checkpoints, logs):
:mod:`locdiff.runfolder`, :mod:`locdiff.trainlog`.

>>> net, config, raw = load_model("runs/demo")   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from locdiff.data.files import DataError, atomic_write_json
from locdiff.diffusion import EMA, DiffusionConfig, Schedule
from locdiff.diffusion.schedules import REFERENCE_STEPS
from locdiff.models import CSUNet, CSUNetConfig
from locdiff.ops import validation

CONFIG_FILE = "config.json"
TOML_FILE = "train.toml"
CHECKPOINT_FILE = "checkpoint.safetensors"
SCHEDULE_KEY = "schedule.alphas_cumprod"  # in checkpoints, beside the weights
# config.json's record of the step whose final validation and calibration completed: a
# resume of a run at train.steps without it runs them again rather than saying "nothing".
FINISHED_KEY = "finished_step"
# 2: the density head, v prediction and the degree-resolving SHDD-KL (runs of version 1
# were trained with another loss and decode differently).
FORMAT_VERSION = 2
# format_version of TOML settings files (`locdiff config --defaults`, train.toml).
TOML_VERSION = 1
SAMPLERS = ("density", "ddim", "ddpm")
MODES = ("density", "function")
SECTIONS = ("model", "diffusion", "train", "data", "predict")


@dataclass
class TrainConfig:
    """Optimisation settings. The learning rate warms up linearly over ``warmup_steps`` and
    then follows a cosine to ``min_lr_ratio * lr``; when ``max_minutes`` is set, the cosine
    runs on whichever of steps or time is further along, so a time-bounded run still ends
    at a low learning rate. A step whose loss exceeds ``spike_factor`` times the median of
    the last 200 is skipped (0: never).

    ``batch_size`` is the global batch: rows per optimizer step over all processes; each of
    ``W`` processes computes ``batch_size / W`` rows in ``accumulate`` pieces. The run folder
    keeps the last ``keep_checkpoints`` checkpoints and the best by validation median;
    ``log_every`` steps a line goes to ``metrics.jsonl`` (and TensorBoard with
    ``tensorboard``)."""

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 5e-4
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    spike_factor: float = 0.0
    max_minutes: float | None = None
    val_every: int = 500
    val_size: int = 1000
    checkpoint_every: int = 500
    checkpoint_minutes: float = 2.0
    seed: int = 0
    amp: bool = True
    accumulate: int = 1
    keep_checkpoints: int = 1
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class DataConfig:
    """Training data: embeddings (``.npy`` or a folder of shards) and coordinates (CSV or
    ``.npy``), optional validation files (else ``train.val_size`` rows are held out), and the
    loader: ``workers`` reading processes (None: 2 for files, 0 for arrays in memory), each
    keeping ``prefetch`` batches ready."""

    embeddings: str | None = None
    coords: str | None = None
    val_embeddings: str | None = None
    val_coords: str | None = None
    workers: int | None = None
    prefetch: int = 4


@dataclass
class PredictConfig:
    """How a trained run predicts.

    ``sampler``: ``"density"`` reads the density head (or the clean-vector estimate) at the
    last timestep, one network call per input; ``"ddim"`` (``steps`` steps, ``eta``) and
    ``"ddpm"`` draw ``samples`` SHDD vectors per input and average them (the mean vector
    describes the mixture of their kernels). ``guidance``: classifier-free guidance weight.
    ``temperature``: of reported densities ``softmax(f / t)``, set by validation NLL.
    ``mode_of``: the point prediction is the mode of the density band-limited to the run's
    degree ("density": the point with the most probability nearby) or the maximum of the
    vector's function ("function"). ``coarse_degree``: decode the mode truncated to this
    degree, then ascend from there (coarse to fine; None: the global mode).
    ``hybrid``: the LocDiff-H settings (:class:`locdiff.hybrid.HybridConfig`) calibrated on
    validation data with the training set as gallery, used when a gallery is given.
    ``credible``: the masses of LocDiff's credible regions that held each share of the
    validation places (``{"locdiff": record}``, :mod:`locdiff.coverage`), written by
    calibration; {}: regions of their nominal mass."""

    sampler: str = "density"
    steps: int = 20
    samples: int = 1
    guidance: float = 0.0
    eta: float = 0.0
    temperature: float = 1.0
    mode_of: str = "density"
    coarse_degree: int | None = None
    hybrid: dict = field(default_factory=dict)
    credible: dict = field(default_factory=dict)
    batch_size: int = 512

    def __post_init__(self):
        from locdiff.coverage import check_records

        check_records(self.credible)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.mode_of not in MODES:
            raise ValueError(f"mode_of must be one of {MODES}, got {self.mode_of!r}")


@dataclass
class RunConfig:
    """Every setting of a run: model, diffusion and loss, optimisation, data, prediction."""

    model: CSUNetConfig = field(default_factory=CSUNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "model": self.model.to_dict(),
                "diffusion": self.diffusion.to_dict(), "train": asdict(self.train),
                "predict": asdict(self.predict), "data": asdict(self.data)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Lenient: unknown keys are ignored (see :func:`config_from_raw` for the checked read)."""
        def pick(klass, sub):
            return klass(**{k: v for k, v in (sub or {}).items() if k in klass.__dataclass_fields__})
        return cls(CSUNetConfig.from_dict(d.get("model", {})), DiffusionConfig.from_dict(d.get("diffusion", {})),
                   pick(TrainConfig, d.get("train")), pick(PredictConfig, d.get("predict")),
                   pick(DataConfig, d.get("data")))


def write_config(run_dir, config: RunConfig, extra: dict | None = None) -> None:
    """``config.json``; ``extra`` keys are added (a dict merges into a section of the same name)."""
    d = config.to_dict()
    for k, v in (extra or {}).items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    atomic_write_json(Path(run_dir) / CONFIG_FILE, d)


def config_from_raw(raw, source: str) -> RunConfig:
    """The :class:`RunConfig` of a parsed ``config.json``: every section's keys and types
    checked (:mod:`locdiff.config`) and the ranges (:func:`locdiff.settings.validate`)."""
    from locdiff import config as C
    from locdiff.settings import validate

    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object of settings, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{source}: format version {version!r}, this locdiff reads version {FORMAT_VERSION} "
                        "(train the run again with this version)")
    parts = {}
    for name in SECTIONS:
        klass = RunConfig.__dataclass_fields__[name].default_factory
        parts[name] = C.from_dict(klass, raw.get(name, {}), source=source, prefix=f"{name}.")
    if "embedding_dim" in raw and (type(raw["embedding_dim"]) is not int or raw["embedding_dim"] < 1):
        raise DataError(f"{source}: embedding_dim = {raw['embedding_dim']!r}: expected an integer >= 1")
    cfg = RunConfig(**parts)
    validate(cfg, source=source)
    return cfg


def read_config(run_dir) -> tuple[RunConfig, dict]:
    """``(RunConfig, raw dict)`` of a run folder; :class:`DataError` if it is not one."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir}: " + ("is a file, not a run folder" if Path(run_dir).exists()
                                          else "run folder not found"))
    if not path.is_file():
        raise DataError(f"{path}: not found (is {run_dir} a locdiff run folder?)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # (a JSONDecodeError, or an integer of 5,000 digits)
        raise DataError(f"{path}: invalid JSON ({getattr(err, 'msg', err)})") from None
    except RecursionError:  # nesting deeper than the parser goes: no config is
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    return config_from_raw(raw, str(path)), raw


def tensors_digest(tensors: dict) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def checkpoint_bytes(net, ema: EMA, opt, state: dict, schedule: Schedule | None = None) -> bytes:
    """One safetensors file with weights (``model.``), EMA weights (``ema.``), optimizer
    tensors (``optim.<param>.<name>``), the noise schedule's abar (:data:`SCHEDULE_KEY`) and
    as metadata the JSON training state and the tensors' SHA-256."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if schedule is not None:
        tensors[SCHEDULE_KEY] = schedule.alphas_cumprod.detach().cpu().contiguous()
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(osd["param_groups"]),
            "ema_updates": str(ema.num_updates), "sha256": tensors_digest(tensors),
            "format_version": str(FORMAT_VERSION)}
    return st_save(tensors, metadata=meta)


MAX_HEADER_BYTES = 1 << 26  # a checkpoint's JSON header: names, shapes, offsets and the training state


def _unreadable(path, detail: str) -> DataError:
    return DataError(f"{path}: unreadable checkpoint, truncated or not a checkpoint ({detail})")


def _read_header(f, path, size: int) -> tuple[int, dict]:
    """(length, parsed JSON) of the safetensors header at the start of open file ``f`` of
    ``size`` bytes, or a DataError naming ``path``."""
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
        raise _unreadable(path, f"{size} bytes, no safetensors header")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as err:
        raise _unreadable(path, f"its header does not parse: {type(err).__name__}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "its header does not parse: not a table")
    return n, header


def read_checkpoint_bytes(path) -> bytes:
    """A checkpoint file's bytes, once its header has said how many there are: a file of
    another length (truncated, padded, a sparse file of gigabytes) is refused before it is
    read whole."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n, header = _read_header(f, path, size)
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise _unreadable(path, f"its header does not parse: {type(err).__name__}") from None
        if 8 + n + end != size:
            raise _unreadable(path, f"{size} bytes where its header describes {8 + n + end}")
        f.seek(0)
        return f.read()


def parse_checkpoint(data: bytes, path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of checkpoint bytes, the checksum verified when recorded."""
    try:
        tensors = st_load(data)
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
    except Exception as err:
        raise _unreadable(path, " ".join(str(err).split())[:200] or type(err).__name__) from None
    try:
        state = json.loads(meta.get("state", "{}"))
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("step", 0), int):
        raise DataError(f"{path}: the checkpoint's metadata is damaged (training state "
                        f"{' '.join(str(meta.get('state'))[:80].split())})")
    want = meta.get("sha256")
    if want is not None and tensors_digest(tensors) != want:
        raise DataError(f"{path}: checksum mismatch: the checkpoint's bytes changed after it was written "
                        "(a damaged copy or disk); restore it from a copy or train again")
    return tensors, meta


def checkpoint_state(path) -> dict:
    """The training state in a checkpoint's header (the step, its history), read without the
    weights; {} where the header cannot be read (the loaders name what is wrong)."""
    try:
        with open(path, "rb") as f:
            meta = _read_header(f, path, os.fstat(f.fileno()).st_size)[1].get("__metadata__") or {}
        state = json.loads(meta.get("state", "{}"))
    except (OSError, DataError, ValueError, RecursionError, AttributeError):
        return {}
    return state if isinstance(state, dict) else {}


def finished_step(raw: dict, state: dict):
    """The step at which the run last finished (its validation and calibration done), from
    its raw config and its checkpoint's ``state``; None for a run stopped before that. An
    earlier locdiff recorded neither this nor ``val_predict``: its checkpoint at the end of
    its steps or time budget was a finished run's."""
    finished = raw.get(FINISHED_KEY)
    if finished is None and "val_predict" not in state:
        # (one that stopped at train.steps or at its time budget; a periodic checkpoint did not)
        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        step, steps, budget = state.get("step", 0), train.get("steps"), train.get("max_minutes")
        if (isinstance(steps, int) and step >= steps) or (
                isinstance(budget, (int, float)) and state.get("elapsed_s", 0) >= 60 * budget):
            finished = step
    return finished


def saved_checkpoints(run_dir) -> list[str]:
    """The names of the checkpoints in ``run_dir`` (the latest, kept ones, the best), sorted."""
    return sorted(p.name for p in Path(run_dir).glob("checkpoint*.safetensors"))


def load_checkpoint(run_dir, name: str = CHECKPOINT_FILE) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a run's checkpoint (``name``: another kept checkpoint)."""
    path = Path(run_dir) / name
    if not path.is_file():
        others = saved_checkpoints(run_dir)
        if others:  # the latest is gone, kept or best ones are there
            raise DataError(f"{path}: not found, but {', '.join(others)} are there; copy the one to use to "
                            f"{name} (checkpoint-best: the lowest validation median)")
        raise DataError(f"{path}: no checkpoint (training has not saved one yet)")
    return parse_checkpoint(read_checkpoint_bytes(path), path)


def check_schedule(tensors: dict, path, config: RunConfig) -> None:
    """A DataError unless the noise schedule the weights were trained under (recorded in
    the checkpoint) is the one ``config`` gives: the network has learned what each timestep's
    noise level is, and a sampler on another schedule feeds it levels it never saw."""
    dc = config.diffusion
    held = tensors.get(SCHEDULE_KEY)
    if held is None:
        # Checkpoints from before the record: 1000-step schedules are unchanged since, and
        # shorter ones were the betas rescaled by 1000 / n (docs/model.md, "Noise schedules").
        if dc.timesteps != REFERENCE_STEPS:
            raise DataError(f"{path}: trained under the {dc.timesteps}-step {dc.schedule} schedule of an earlier "
                            f"locdiff, whose noise levels differ from this version's; train the run again")
        return
    want = dc.make_schedule().alphas_cumprod
    if held.shape != want.shape or not torch.allclose(held.to(want.dtype), want, rtol=1e-6, atol=0):
        raise DataError(f"{path}: trained under another noise schedule ({len(held)} steps) than {CONFIG_FILE}'s "
                        f"diffusion.schedule = {dc.schedule!r}, timesteps = {dc.timesteps} gives; restore the "
                        "run's own config.json")


def _check_degree(sd: dict, path, config: RunConfig) -> None:
    # Before the network is built: a config.json saying degree 2000 beside degree-4 weights
    # would build a network of that degree first.
    bias = sd.get("out.bias")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != config.model.dim):
        held = math.isqrt(bias.shape[0]) - 1 if bias.ndim == 1 else f"? (out.bias of shape {tuple(bias.shape)})"
        raise DataError(f"{path}: the weights are of degree {held} but {CONFIG_FILE} says model.degree = "
                        f"{config.model.degree}")


def _load_weights(net, sd: dict, path, config: RunConfig) -> None:
    # (float8 has no isfinite: such weights are checked in float32)
    bad = next((k for k, v in sd.items() if v.dtype.is_floating_point
                and not bool(torch.isfinite(v.float() if v.element_size() == 1 else v).all())), None)
    if bad is not None:
        raise DataError(f"{path}: weight {bad} holds NaN or infinite values (the run diverged or the file is damaged)")
    _check_degree(sd, path, config)
    if config.model.emb_dim == 1 and "emb_net.0.weight" in sd:
        # Runs of a 1-wide embedding before the norm was dropped learned from its LayerNorm's bias
        # alone, a constant: such weights have no use for the condition now read.
        raise DataError(f"{path}: trained when a 1-wide embedding was normalised to a constant (the model ignored "
                        "it); train the run again")
    try:
        net.load_state_dict(sd)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        raise DataError(f"{path}: weights do not match {CONFIG_FILE} ({lines[-1] if lines else err})") from None


def restore(tensors: dict, meta: dict, net, ema: EMA, opt, path=CHECKPOINT_FILE, config=None) -> dict:
    """Load a checkpoint's weights, EMA and optimizer state; returns the training state.
    (Its noise schedule is checked by the caller: train's rank 0, before the checkpoint
    reaches the other processes.)"""
    cfg = config or RunConfig(model=net.config)
    _load_weights(net, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path, cfg)
    # The SHA-256 covers the tensors, not the metadata: an edited or damaged entry is named.
    try:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")},
                            int(meta.get("ema_updates", 0)))
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        training = json.loads(meta["state"])  # (its form was checked by parse_checkpoint)
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as err:
        raise DataError(f"{path}: the optimizer or training state does not match the model, or the checkpoint's "
                        f"metadata is damaged ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return training


def load_model(run_dir, device="cpu", ema: bool = True) -> tuple[CSUNet, RunConfig, dict]:
    """The trained network (EMA weights by default) in eval mode, its config and raw config."""
    device = validation.check_device(device)
    config, raw = read_config(run_dir)
    tensors, _ = load_checkpoint(run_dir)
    check_schedule(tensors, Path(run_dir) / CHECKPOINT_FILE, config)
    prefix = "ema." if ema else "model."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    _check_degree(sd, Path(run_dir) / CHECKPOINT_FILE, config)
    net = CSUNet(config.model)
    _load_weights(net, sd, Path(run_dir) / CHECKPOINT_FILE, config)
    return net.to(device).eval(), config, raw
