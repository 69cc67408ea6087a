"""Ranges of a run's settings, checked before anything is written or computed, and the
largest SHDD degree whose training fits this machine's memory.

Types are :mod:`locdiff.config`'s business; this module checks values: each failure is one
:class:`SettingError` line naming the setting, its value and what is expected.

>>> validate(RunConfig())                       # doctest: +SKIP
>>> validate(cfg, device="cuda", rows_per_call=128)  # with the memory bound on the degree  # doctest: +SKIP
"""
from __future__ import annotations

import math

from locdiff.data.files import DataError

# The SHDD kernels' own bound (locdiff.ops.validation.MAX_DEGREE).
KERNEL_MAX_DEGREE = 4096
# Classifier-free guidance weights accepted (config and Predictor): beyond, the guided vector
# is the difference of two predictions scaled past float32's useful precision.
MAX_GUIDANCE = 1e6


class SettingError(DataError):
    """A setting out of its range: ``key`` (``"model.degree"``), ``value``, ``expected``."""

    def __init__(self, key: str, value, expected: str, source: str | None = None):
        self.key, self.value, self.expected, self.source = key, value, expected, source
        super().__init__(f"{source + ': ' if source else ''}{key} = {value!r}: expected {expected}")


def _int(lo=None, hi=None):
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    text = "an integer" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else "")
    return ok, text


def _num(lo=None, hi=None, lo_open=False, hi_open=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    return ok, text


def _optional(check):
    ok, text = check
    return (lambda v: v is None or ok(v)), f"{text} or none"


def _choice(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _ints(lo):
    return (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(lo)[0](x) for x in v),
            f"a non-empty list of integers >= {lo}")


RULES = {
    "model": {"emb_dim": _int(1), "widths": _ints(1), "cond_dim": _int(1), "dropout": _num(0, 1, hi_open=True),
              "emb_widths": ((lambda v: isinstance(v, (list, tuple)) and all(_int(1)[0](x) for x in v)),
                             "a list of integers >= 1"),
              "emb_dropout": _num(0, 1, hi_open=True), "w0": _num(0, lo_open=True), "w0_first": _num(0, lo_open=True),
              "bottleneck_depth": _int(0), "density_from": _choice("embedding", "trunk"), "timesteps": _int(2)},
    "diffusion": {"schedule": _choice("cosine", "linear"), "timesteps": _int(2),
                  "prediction": _choice("eps", "x0", "v"), "mse_weight": _num(0), "kl_weight": _num(0),
                  "kl_sharpness": _num(0, lo_open=True), "kl_grid_oversample": _num(0, lo_open=True),
                  "density_fraction": _num(0, 1, lo_open=True), "smoothing": _optional(_num(0, lo_open=True)),
                  "p_uncond": _num(0, 1, hi_open=True), "timestep_power": _num(0, lo_open=True),
                  "scale": _num(0, lo_open=True)},
    "train": {"steps": _int(1), "batch_size": _int(1), "lr": _num(0, lo_open=True), "min_lr_ratio": _num(0, 1),
              "weight_decay": _num(0), "warmup_steps": _int(0), "grad_clip": _num(0), "ema_decay": _num(0, 1, hi_open=True),
              "spike_factor": _num(0), "max_minutes": _optional(_num(0, lo_open=True)), "val_every": _int(0),
              "val_size": _int(0), "checkpoint_every": _int(0), "checkpoint_minutes": _num(0, lo_open=True),
              "seed": _int(0, 2**63 - 1), "accumulate": _int(1), "keep_checkpoints": _int(1), "log_every": _int(1)},
    "data": {"workers": _optional(_int(0)), "prefetch": _int(1)},
    "predict": {"steps": _int(1), "samples": _int(1), "guidance": _num(-MAX_GUIDANCE, MAX_GUIDANCE), "eta": _num(0),
                "temperature": _num(0, lo_open=True), "batch_size": _int(1), "coarse_degree": _optional(_int(1))},
}


def validate(config, *, source: str | None = None, device=None, rows_per_call: int | None = None) -> None:
    """Raise :class:`SettingError` for the first setting of ``config`` (a
    :class:`locdiff.run.RunConfig`) out of range. With ``device``, the degree is also bounded
    by the memory of that device for training ``rows_per_call`` rows a call
    (:func:`max_degree`); without, by the kernels' bound."""
    for section, rules in RULES.items():
        sub = getattr(config, section)
        for name, (ok, expected) in rules.items():
            value = getattr(sub, name)
            if not ok(value):
                raise SettingError(f"{section}.{name}", value, expected, source)
    mc, dc = config.model, config.diffusion
    if dc.mse_weight == 0 and dc.kl_weight == 0:
        raise SettingError("diffusion.kl_weight", dc.kl_weight, "> 0 when diffusion.mse_weight is 0 (the loss "
                           "would be empty)", source)
    top, why = KERNEL_MAX_DEGREE, "the SHDD kernels' largest degree"
    if device is not None:
        top, why = max_degree(config, device, rows_per_call or config.train.batch_size)
    deg = mc.degree
    if isinstance(deg, bool) or not isinstance(deg, int) or not 1 <= deg <= top:
        raise SettingError("model.degree", deg, f"an integer in [1, {top}] ({why})", source)
    pc = config.predict
    if pc.sampler == "ddim" and pc.steps > dc.timesteps:
        raise SettingError("predict.steps", pc.steps, f"an integer in [1, {dc.timesteps}] for the ddim sampler "
                           "(diffusion.timesteps)", source)
    cd = config.predict.coarse_degree
    if cd is not None and cd >= deg:
        raise SettingError("predict.coarse_degree", cd, f"none or an integer in [1, {deg - 1}] (below model.degree)",
                           source)


def parameters_at(model_config, degree: int) -> int:
    """Parameters of the CS-UNet of ``model_config`` at ``degree``: built on the meta device
    at two degrees (the count is affine in the number of coefficients), nothing allocated."""
    import dataclasses

    import torch

    from locdiff.models import CSUNet

    def count(d):
        with torch.device("meta"):
            return sum(p.numel() for p in CSUNet(dataclasses.replace(model_config, degree=d)).parameters())
    a, b = count(1), count(2)
    per_coeff = (b - a) // 5  # (2+1)^2 - (1+1)^2 coefficients
    return a + per_coeff * ((degree + 1) ** 2 - 4)


def training_bytes(config, degree: int, rows: int) -> int:
    """An estimate of the memory training needs at ``degree``: weights, gradients, two AdamW
    moments, EMA and the checkpoint's copy (24 bytes a parameter), and per row of a call the
    coefficient vectors (target, noise, input, output, their gradients), the hidden layers
    and the SHDD-KL's values on its grid (prediction, target, softmax, gradient)."""
    params = parameters_at(config.model, degree)
    dim = (degree + 1) ** 2
    per_row = 12 * dim + 8 * (sum(config.model.widths) + config.model.cond_dim)
    if config.diffusion.kl_weight > 0:
        per_row += 4 * kl_grid_points(degree, config.diffusion.kl_sharpness, config.diffusion.kl_grid_oversample)
    return 24 * params + 4 * rows * per_row


def kl_grid_points(degree: int, sharpness: float, oversample: float) -> int:
    """Points of the SHDD-KL grid, sized as :func:`locdiff.diffusion.losses.kl_grid` sizes it
    (computed here, so that nothing is built for a degree that does not fit)."""
    std = 1.85 / ((degree + 1) * math.sqrt(sharpness))
    nlat = max(8, math.ceil(oversample * math.pi / std))
    nlat += nlat % 2
    return nlat * (1 << (2 * nlat - 1).bit_length())


def available_bytes(device) -> tuple[int | None, str]:
    """Memory free for a run on ``device``: free GPU memory, or the system's available memory
    (``MemAvailable``); None when it cannot be told."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"GPU {dev}"
    from locdiff.ops.validation import available_memory_bytes, physical_memory_bytes

    free = available_memory_bytes()
    if free is not None:
        return free, "available memory"
    free = physical_memory_bytes()
    return (free, "physical memory") if free is not None else (None, "")


def max_degree(config, device, rows: int) -> tuple[int, str]:
    """The largest degree whose training (:func:`training_bytes`, ``rows`` rows a call)
    fits the memory of ``device``, and the reason in words."""
    free, what = available_bytes(device)
    if free is None:
        return KERNEL_MAX_DEGREE, "the SHDD kernels' largest degree"
    lo, hi = 0, KERNEL_MAX_DEGREE
    while lo < hi:  # the need grows with the degree
        mid = (lo + hi + 1) // 2
        if training_bytes(config, mid, rows) <= free:
            lo = mid
        else:
            hi = mid - 1
    if lo == KERNEL_MAX_DEGREE:
        return lo, "the SHDD kernels' largest degree"
    return lo, f"the largest whose training fits the {free / 2**30:.1f} GiB of {what}"
