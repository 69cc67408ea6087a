"""Run folders: the run's settings (:class:`RunConfig`), device choice, and checkpoint I/O.

A run folder holds ``config.json`` (model, diffusion, training and prediction settings) and
``checkpoint.safetensors`` (weights, EMA weights, optimizer state; the training state as JSON
metadata). Both are written to a temporary file and renamed with ``os.replace``, so a killed
run leaves the previous checkpoint intact. Nothing is ever unpickled.

>>> net, config, raw = load_model("runs/demo")   # doctest: +SKIP
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from locdiff.data.files import DataError, atomic_write_bytes
from locdiff.diffusion import EMA, DiffusionConfig
from locdiff.models import CSUNet, CSUNetConfig

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
# 2: the density head, v prediction and the degree-resolving SHDD-KL (runs of version 1
# were trained with another loss and decode differently).
FORMAT_VERSION = 2
SAMPLERS = ("density", "ddim", "ddpm")
MODES = ("density", "function")


@dataclass
class TrainConfig:
    """Optimisation settings. The learning rate warms up linearly over ``warmup_steps`` and
    then follows a cosine to ``min_lr_ratio * lr``; when ``max_minutes`` is set, the cosine
    runs on whichever of steps or time is further along, so a time-bounded run still ends
    at a low learning rate. A step whose loss exceeds ``spike_factor`` times the median of
    the last 200 is skipped (0: never)."""

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
    validation data with the training set as gallery, used when a gallery is given."""

    sampler: str = "density"
    steps: int = 20
    samples: int = 1
    guidance: float = 0.0
    eta: float = 0.0
    temperature: float = 1.0
    mode_of: str = "density"
    coarse_degree: int | None = None
    hybrid: dict = field(default_factory=dict)
    batch_size: int = 512

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.mode_of not in MODES:
            raise ValueError(f"mode_of must be one of {MODES}, got {self.mode_of!r}")


@dataclass
class RunConfig:
    model: CSUNetConfig = field(default_factory=CSUNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "model": self.model.to_dict(),
                "diffusion": self.diffusion.to_dict(), "train": asdict(self.train),
                "predict": asdict(self.predict)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        def pick(klass, sub):
            return klass(**{k: v for k, v in (sub or {}).items() if k in klass.__dataclass_fields__})
        return cls(CSUNetConfig.from_dict(d.get("model", {})), DiffusionConfig.from_dict(d.get("diffusion", {})),
                   pick(TrainConfig, d.get("train")), pick(PredictConfig, d.get("predict")))


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU. An explicit CUDA request without CUDA
    is an error, never a silent CPU run."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev


def write_config(run_dir, config: RunConfig, extra: dict | None = None) -> None:
    d = config.to_dict()
    d.update(extra or {})
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, (json.dumps(d, indent=2) + "\n").encode())


def read_config(run_dir) -> tuple[RunConfig, dict]:
    """``(RunConfig, raw dict)`` of a run folder; :class:`DataError` if it is not one."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found (is {run_dir} a locdiff run folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format version {version!r}, this locdiff reads version {FORMAT_VERSION} "
                        "(train the run again with this version)")
    return RunConfig.from_dict(raw), raw


def save_checkpoint(run_dir, net, ema: EMA, opt, state: dict) -> None:
    """One file with weights (``model.``), EMA weights (``ema.``), optimizer tensors
    (``optim.<param>.<name>``) and the JSON training state as metadata, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(osd["param_groups"]),
            "ema_updates": str(ema.num_updates)}
    atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, st_save(tensors, metadata=meta))


def load_checkpoint(run_dir) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a run's checkpoint."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint (training has not saved one yet)")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    except Exception as err:
        raise DataError(f"{path}: unreadable checkpoint ({err})") from None
    return tensors, meta


def restore(tensors: dict, meta: dict, net, ema: EMA, opt) -> dict:
    """Load a checkpoint's weights, EMA and optimizer state; returns the training state."""
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")},
                        int(meta.get("ema_updates", 0)))
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])


def load_model(run_dir, device="cpu", ema: bool = True) -> tuple[CSUNet, RunConfig, dict]:
    """The trained network (EMA weights by default) in eval mode, its config and raw config."""
    config, raw = read_config(run_dir)
    tensors, _ = load_checkpoint(run_dir)
    net = CSUNet(config.model)
    prefix = "ema." if ema else "model."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(sd)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise DataError(f"{Path(run_dir) / CHECKPOINT_FILE}: weights do not match {CONFIG_FILE} ({first})") from None
    return net.to(device).eval(), config, raw
