"""Training loop: AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights,
bfloat16 autocast on GPU, periodic validation, ``steps`` and ``max_minutes`` bounds, and
atomic, resumable checkpoints.

A run folder holds ``config.json`` (model, diffusion, training and prediction settings) and
``checkpoint.safetensors`` (weights, EMA weights, optimizer state; the training state as JSON
metadata). Both are written to a temporary file and renamed with ``os.replace``, so a killed
run leaves the previous checkpoint intact; ``resume=True`` continues from it. Each step
draws its batch and noise from generators seeded by ``(seed, step)``, so a resumed run
sees the same data as an uninterrupted one.

>>> result = train(emb, coords, "runs/demo", RunConfig(train=TrainConfig(steps=2000)))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from locdiff.data.files import DataError, atomic_write_bytes
from locdiff.diffusion import EMA, DiffusionConfig, diffusion_loss
from locdiff.models import CSUNet, CSUNetConfig

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Optimisation settings. The learning rate warms up linearly over ``warmup_steps`` and
    then follows a cosine to ``min_lr_ratio * lr``; when ``max_minutes`` is set, the cosine
    runs on whichever of steps or time is further along, so a time-bounded run still ends
    at a low learning rate. ``kl_grid_nlat``: rings of the equiangular grid of the KL term."""

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    max_minutes: float | None = None
    val_every: int = 500
    val_size: int = 1000
    checkpoint_every: int = 500
    checkpoint_minutes: float = 2.0
    kl_grid_nlat: int = 32
    seed: int = 0
    amp: bool = True


@dataclass
class PredictConfig:
    """Sampling at prediction time: DDIM ``steps`` (1 = the clean-vector estimate from pure
    noise), ``samples`` per input averaged in SHDD space (the mean of sampled vectors
    describes the mixture of their densities; its mode is the prediction), CFG ``guidance``,
    DDIM ``eta``, and the ``temperature`` of reported densities."""

    steps: int = 1
    samples: int = 8
    guidance: float = 0.0
    eta: float = 0.0
    temperature: float = 1.0
    batch_size: int = 512


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


@dataclass
class TrainResult:
    steps: int
    elapsed_s: float
    samples_per_s: float
    history: list = field(default_factory=list)


# ---- devices ---------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU. An explicit CUDA request without CUDA
    is an error, never a silent CPU run."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev


# ---- checkpoints -----------------------------------------------------------------------------
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
        import struct

        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    except Exception as err:
        raise DataError(f"{path}: unreadable checkpoint ({err})") from None
    return tensors, meta


def _restore(tensors: dict, meta: dict, net, ema: EMA, opt) -> dict:
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
    net.load_state_dict(sd)
    return net.to(device).eval(), config, raw


# ---- the loop --------------------------------------------------------------------------------
def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Warm-up then cosine from 1 to ``min_lr_ratio`` over ``progress`` in [0, 1]."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    c = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * c


def _gather(emb, idx: np.ndarray) -> np.ndarray:
    # Sorted reads keep memory-mapped files sequential; the batch order is restored after.
    order = np.argsort(idx)
    rows = np.asarray(emb[idx[order]], dtype=np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return out


class _Stop:
    """Turns SIGTERM/SIGINT into a flag, so the loop saves a checkpoint before exiting."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def calibrate_temperature(net, ema: EMA, config: RunConfig, device, val) -> float:
    """The density temperature (of :data:`TEMPERATURES`) with the lowest NLL of the
    validation truths under the predicted densities (EMA weights, the run's sampler)."""
    from locdiff import shdd
    from locdiff.predict import Predictor

    ema_net = CSUNet(config.model).to(device)
    ema.copy_to(ema_net)
    coeffs = Predictor(ema_net.eval(), config, device).coefficients(val[0]).double()
    truth = torch.as_tensor(np.asarray(val[1], np.float64))
    nll = [-float(shdd.log_density_at(coeffs, truth, temperature=t).mean()) for t in TEMPERATURES]
    return TEMPERATURES[int(np.argmin(nll))]


def train(embeddings, coords, run_dir, config: RunConfig | None = None, *, resume: bool = False,
          device: str | None = None, val: tuple | None = None, progress: bool = True,
          extra_config: dict | None = None, log=None) -> TrainResult:
    """Train a CS-UNet on ``embeddings`` (N, D) (array or memmap) and ``coords`` (N, 2).

    ``val``: optional ``(embeddings, coords)`` for validation; by default ``val_size`` random
    rows are held out of the training data. Validation reports the median error and the
    accuracy within 750 km of one-step predictions with the EMA weights; at the end the
    density temperature of the prediction config is set by validation NLL
    (:func:`calibrate_temperature`). Returns a
    :class:`TrainResult`; the run folder holds the config and the final checkpoint.
    """
    from tqdm.auto import tqdm

    from locdiff import grids, shdd
    from locdiff.predict import Predictor

    log = log or (lambda msg: tqdm.write(msg))
    config = config or RunConfig()
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    n, d = embeddings.shape
    coords = np.asarray(coords, np.float64)
    if len(coords) != n:
        raise DataError(f"coordinates: {len(coords)} rows but the embeddings have {n}")
    mc = config.model
    if mc.emb_dim != d:
        mc.emb_dim = d
    tc, dc = config.train, config.diffusion
    mc.timesteps = dc.timesteps

    rng = np.random.default_rng(tc.seed)
    if val is None and tc.val_size > 0 and n > 4 * tc.val_size:
        val_idx = np.sort(rng.choice(n, tc.val_size, replace=False))
        train_idx = np.setdiff1d(np.arange(n), val_idx)
        val = (_gather(embeddings, val_idx), coords[val_idx])
    else:
        train_idx = np.arange(n)

    ckpt = run_dir / CHECKPOINT_FILE
    if resume and (run_dir / CONFIG_FILE).is_file():
        old, _ = read_config(run_dir)
        if old.model != mc:
            raise DataError(f"{run_dir / CONFIG_FILE}: model settings differ from this run's; "
                            "resume with the same settings or use a new --out")
        config = RunConfig(old.model, old.diffusion, tc, old.predict)
        mc, dc = old.model, old.diffusion
    elif ckpt.exists():
        raise DataError(f"{run_dir}: already holds a checkpoint; pass --resume or choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config, {"embedding_dim": d, **(extra_config or {})})

    torch.manual_seed(tc.seed)
    net = CSUNet(mc).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(net, tc.ema_decay)
    state = {"step": 0, "elapsed_s": 0.0, "history": []}
    if resume and ckpt.exists():
        tensors, meta = load_checkpoint(run_dir)
        state = _restore(tensors, meta, net, ema, opt)
        log(f"resumed {run_dir} at step {state['step']}")
    schedule = dc.make_schedule().to(dev)
    grid = grids.equiangular(tc.kl_grid_nlat)
    amp = tc.amp and dev.type == "cuda"
    max_s = tc.max_minutes * 60 if tc.max_minutes else None

    step, elapsed0 = state["step"], state["elapsed_s"]
    t_start = time.perf_counter()
    last_ckpt = t_start
    samples, step_s = 0, 0.0

    def elapsed():
        return elapsed0 + time.perf_counter() - t_start

    def validate():
        if val is None:
            return None
        net.eval()
        ema_net = CSUNet(mc).to(dev)
        ema.copy_to(ema_net)
        pred = Predictor(ema_net.eval(), config, dev).predict(val[0], samples=1, steps=1)
        from locdiff.metrics import distance_metrics

        m = distance_metrics(pred["latlon"], val[1])
        return {"step": step, "median_km": round(m["median_km"], 1), "acc_750km": round(m["acc_750km"], 4)}

    def checkpoint():
        state.update(step=step, elapsed_s=elapsed())
        save_checkpoint(run_dir, net, ema, opt, state)

    bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    with _Stop() as stop:
        while step < tc.steps and not stop.flag and not (max_s and elapsed() >= max_s):
            t_step = time.perf_counter()
            prog = max(step / tc.steps, elapsed() / max_s if max_s else 0.0)
            for g in opt.param_groups:
                g["lr"] = tc.lr * lr_factor(step, prog, tc)
            # Per-step seeds: the batch, noise and dropout of step s do not depend on where
            # the run was resumed.
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            torch.manual_seed(tc.seed * 1_000_003 + step)
            idx = train_idx[torch.randint(0, len(train_idx), (tc.batch_size,), generator=gen).numpy()]
            emb = torch.from_numpy(_gather(embeddings, idx)).to(dev)
            if not bool(torch.isfinite(emb).all()):
                raise DataError("embeddings: NaN or infinite values in the training rows")
            x0 = shdd.encode(torch.from_numpy(coords[idx]), mc.degree, smoothing=dc.smoothing).float().to(dev)
            net.train()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss, parts = diffusion_loss(net, x0, emb, schedule, dc, grid=grid,
                                             generator=gen if dev.type == "cpu" else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            ema.update(net)
            step += 1
            samples += tc.batch_size
            step_s += time.perf_counter() - t_step
            bar.update(1)
            if step % 10 == 0 or step == tc.steps:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            if tc.val_every and step % tc.val_every == 0 and step < tc.steps:
                v = validate()
                if v:
                    state["history"].append(v)
                    log(f"step {step}: validation median {v['median_km']:.0f} km, "
                        f"acc@750km {100 * v['acc_750km']:.1f}%")
            now = time.perf_counter()
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or \
                    now - last_ckpt > 60 * tc.checkpoint_minutes:
                checkpoint()
                last_ckpt = now
    bar.close()
    v = validate()
    if v:
        state["history"].append(v)
        log(f"step {step}: validation median {v['median_km']:.0f} km, acc@750km {100 * v['acc_750km']:.1f}%")
    checkpoint()
    if val is not None and step > 0:
        tau = calibrate_temperature(net, ema, config, dev, val)
        config.predict.temperature = tau
        write_config(run_dir, config, {"embedding_dim": d, **(extra_config or {})})
        log(f"density temperature {tau:g} (lowest validation NLL)")
    if stop.flag:
        log(f"interrupted at step {step}; checkpoint saved, continue with --resume")
    # Throughput counts the training steps only (not validation or checkpoints).
    return TrainResult(step, elapsed(), samples / max(step_s, 1e-9), state["history"])
