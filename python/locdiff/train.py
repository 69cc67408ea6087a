"""Training loop: AdamW, linear warm-up then cosine decay, gradient clipping, loss-spike
skipping, EMA weights, bfloat16 autocast on GPU, periodic validation, ``steps`` and
``max_minutes`` bounds, and atomic, resumable checkpoints (run folders: :mod:`locdiff.run`).

Each step draws its batch and noise from generators seeded by ``(seed, step)``, so a resumed
run sees the same data as an uninterrupted one. At the end, validation data set the density
temperature and the coarse decoding degree of the run's prediction settings.

>>> result = train(emb, coords, "runs/demo", RunConfig(train=TrainConfig(steps=2000)))  # doctest: +SKIP
"""
from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from locdiff.data.files import DataError
from locdiff.diffusion import EMA, diffusion_loss
from locdiff.diffusion.losses import kl_temperature
from locdiff.models import CSUNet
from locdiff.run import (CHECKPOINT_FILE, CONFIG_FILE, PredictConfig, RunConfig, TrainConfig, load_checkpoint,
                         read_config, resolve_device, restore, save_checkpoint, write_config)

__all__ = ["PredictConfig", "RunConfig", "TrainConfig", "TrainResult", "calibrate", "lr_factor", "train"]


@dataclass
class TrainResult:
    steps: int
    elapsed_s: float
    samples_per_s: float
    history: list = field(default_factory=list)
    skipped_steps: int = 0


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


# Density temperatures tried by calibration, in units of the SHDD-KL temperature f0 / 16
# at the run's degree (the density head learns densities near that scale).
TEMPERATURE_FACTORS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0, 23.0, 32.0)
COARSE_DEGREES = (4, 8, 16)


# LocDiff-H is calibrated against at most this many training rows as gallery (the search
# runs over all of them for every validation row).
HYBRID_GALLERY_ROWS = 200_000


def calibrate(predictor, val, gallery=None, log=None) -> dict:
    """Prediction settings chosen on validation data ``(emb, coords)`` with the run's
    sampler: the density temperature with the lowest NLL, the point rule (mode of the
    density or of the function, coarse decoding degree or none) with the lowest median error
    and, with a ``gallery`` ``(emb, coords)``, the LocDiff-H settings with the lowest median
    error. Returns ``{"temperature", "mode_of", "coarse_degree", "hybrid", "val_nll",
    "val_median_km"}``."""
    from locdiff import shdd
    from locdiff.metrics import distance_metrics

    coeffs = predictor.coefficients(val[0]).double()
    truth = torch.as_tensor(np.asarray(val[1], np.float64))
    base = kl_temperature(predictor.degree, 16.0)
    temps = [base * f for f in TEMPERATURE_FACTORS]
    nll = [-float(shdd.log_density_at(coeffs, truth, temperature=t).mean()) for t in temps]
    best_t = int(np.argmin(nll))
    medians = {}
    for mode_of in ("density", "function"):
        for cd in (None, *(d for d in COARSE_DEGREES if d < predictor.degree)):
            latlon = predictor.locate(coeffs, cd, mode_of, temps[best_t])
            medians[mode_of, cd] = distance_metrics(latlon, val[1])["median_km"]
    mode_of, coarse = min(medians, key=medians.get)
    out = {"temperature": temps[best_t], "mode_of": mode_of, "coarse_degree": coarse, "hybrid": {},
           "val_nll": nll[best_t], "val_median_km": medians[mode_of, coarse]}
    if log:
        log(f"calibration: density temperature {out['temperature']:.3g} (validation NLL {out['val_nll']:.3f}), "
            f"mode of the {mode_of}, coarse degree {coarse} (validation median {out['val_median_km']:.0f} km)")
    if gallery is not None:
        from locdiff.hybrid import Hybrid

        fit = Hybrid(*gallery).fit(coeffs, temps[best_t], val[0], predictor.locate(coeffs, coarse, mode_of, temps[best_t]),
                                   val[1])
        out["hybrid"] = {k: v for k, v in fit.items() if k != "score"}
        if log:
            log(f"calibration: LocDiff-H weight {fit['weight']:g}, bandwidth {fit['bandwidth_km']:g} km, "
                f"temperature {fit['temperature']:g} (validation median {fit['score']:.0f} km)")
    return out


def train(embeddings, coords, run_dir, config: RunConfig | None = None, *, resume: bool = False,
          device: str | None = None, val: tuple | None = None, progress: bool = True,
          extra_config: dict | None = None, log=None) -> TrainResult:
    """Train a CS-UNet on ``embeddings`` (N, D) (array or memmap) and ``coords`` (N, 2).

    ``val``: optional ``(embeddings, coords)`` for validation; by default ``val_size`` random
    rows are held out of the training data. Validation reports the median error and the
    accuracy within 750 km of the run's predictions with the EMA weights; at the end
    :func:`calibrate` sets the density temperature and coarse degree of the run's
    prediction settings. Returns a :class:`TrainResult`; the run folder holds the config
    and the final checkpoint.
    """
    from tqdm.auto import tqdm

    from locdiff import shdd
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
    state = {"step": 0, "elapsed_s": 0.0, "history": [], "skipped": 0}
    if resume and ckpt.exists():
        tensors, meta = load_checkpoint(run_dir)
        state = restore(tensors, meta, net, ema, opt)
        state.setdefault("skipped", 0)
        log(f"resumed {run_dir} at step {state['step']}")
    schedule = dc.make_schedule().to(dev)
    amp = tc.amp and dev.type == "cuda"
    max_s = tc.max_minutes * 60 if tc.max_minutes else None

    step, elapsed0 = state["step"], state["elapsed_s"]
    t_start = time.perf_counter()
    last_ckpt = t_start
    samples, step_s = 0, 0.0
    recent = deque(maxlen=200)

    def elapsed():
        return elapsed0 + time.perf_counter() - t_start

    def ema_predictor():
        ema_net = CSUNet(mc).to(dev)
        ema.copy_to(ema_net)
        return Predictor(ema_net.eval(), config, dev)

    def validate():
        if val is None:
            return None
        from locdiff.metrics import distance_metrics

        m = distance_metrics(ema_predictor().predict(val[0])["latlon"], val[1])
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
                loss, parts = diffusion_loss(net, x0, emb, schedule, dc,
                                             generator=gen if dev.type == "cpu" else None)
            value = float(loss.detach())
            # A step whose loss jumps far above the recent median is skipped: one bad batch
            # must not undo hours of training (tc.spike_factor; docs/model.md, "Stability").
            if not math.isfinite(value) or (tc.spike_factor and len(recent) == recent.maxlen
                                            and value > tc.spike_factor * float(np.median(recent))):
                state["skipped"] += 1
                opt.zero_grad(set_to_none=True)
            else:
                recent.append(value)
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
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
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
        rows = train_idx if len(train_idx) <= HYBRID_GALLERY_ROWS else \
            np.sort(np.random.default_rng(tc.seed).choice(train_idx, HYBRID_GALLERY_ROWS, replace=False))
        cal = calibrate(ema_predictor(), val, (_gather(embeddings, rows), coords[rows]), log)
        config.predict.temperature = cal["temperature"]
        config.predict.coarse_degree = cal["coarse_degree"]
        config.predict.mode_of = cal["mode_of"]
        config.predict.hybrid = cal["hybrid"]
        write_config(run_dir, config, {"embedding_dim": d, **(extra_config or {})})
    if stop.flag:
        log(f"interrupted at step {step}; checkpoint saved, continue with --resume")
    # Throughput counts the training steps only (not validation or checkpoints).
    return TrainResult(step, elapsed(), samples / max(step_s, 1e-9), state["history"], state["skipped"])
