"""A run's settings checked as a whole before anything is written or computed: their
ranges (the rules of :mod:`locdiff.ranges`) and the largest SHDD degree whose training fits
this machine's memory.

Types are :mod:`locdiff.config`'s business; this module checks values: each failure is one
:class:`SettingError` line naming the setting, its value and what is expected.

>>> validate(RunConfig())                       # doctest: +SKIP
>>> validate(cfg, device="cuda", rows_per_call=128)  # with the memory bound on the degree  # doctest: +SKIP
"""
from __future__ import annotations

import math

from locdiff.ranges import RULES, SettingError, check_section

# The SHDD kernels' own bound (locdiff.ops.validation.MAX_DEGREE).
KERNEL_MAX_DEGREE = 4096


def validate(config, *, source: str | None = None, device=None, rows_per_call: int | None = None) -> None:
    """Raise :class:`SettingError` for the first setting of ``config`` (a
    :class:`locdiff.run.RunConfig`) out of range. With ``device``, the degree is also bounded
    by the memory of that device for training ``rows_per_call`` rows a call
    (:func:`max_degree`); without, by the kernels' bound."""
    for section in RULES:
        check_section(section, getattr(config, section), source)
    mc, dc = config.model, config.diffusion
    if dc.mse_weight == 0 and dc.kl_weight == 0:
        raise SettingError("diffusion.kl_weight", dc.kl_weight, "> 0 when diffusion.mse_weight is 0 (the loss "
                           "would be empty)", source)
    top, why = KERNEL_MAX_DEGREE, "the SHDD kernels' largest degree"
    if device is not None:
        top, why = max_degree(config, device, rows_per_call or config.train.batch_size)
        if top < 1:  # the network itself is too large: the degree is not what to change
            raise SettingError("model.widths", list(mc.widths), "a network whose training fits at degree 1 "
                               f"(model.widths, cond_dim and emb_widths set its size; this one needs more than "
                               f"{why.split('fits ', 1)[-1]})",
                               source)
    deg = mc.degree
    if isinstance(deg, bool) or not isinstance(deg, int) or not 1 <= deg <= top:
        raise SettingError("model.degree", deg, f"an integer in [1, {top}] ({why})", source)
    pc = config.predict
    if pc.sampler == "ddim" and pc.steps > dc.timesteps:
        raise SettingError("predict.steps", pc.steps, f"an integer in [1, {dc.timesteps}] for the ddim sampler "
                           "(diffusion.timesteps)", source)
    workers, most = config.data.workers, max_workers()
    if workers is not None and workers > most:
        raise SettingError("data.workers", workers, f"none or an integer in [0, {most}] (4 loader processes per CPU "
                           "core, at least 8: each is a process holding a copy of the trainer)", source)
    cd = config.predict.coarse_degree
    if cd is not None and cd >= deg:
        raise SettingError("predict.coarse_degree", cd, f"none or an integer in [1, {deg - 1}] (below model.degree)",
                           source)


def max_workers() -> int:
    """The most loader processes a run may start: 4 per CPU core, at least 8. Each is a
    forked process; thousands of them exhaust the memory of the whole machine."""
    import os

    return max(8, 4 * (os.cpu_count() or 1))


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
    """Points of the SHDD-KL grid (nothing is built for a degree that does not fit)."""
    from locdiff.diffusion.losses import kl_grid_shape

    return math.prod(kl_grid_shape(degree, sharpness, oversample))


def available_bytes(device) -> tuple[int | None, str]:
    """Memory free for a run on ``device``: free GPU memory, or the system's available memory
    (``MemAvailable``); None when it cannot be told."""
    import torch

    from locdiff.ops.validation import available_memory_bytes, free_gpu_bytes, physical_memory_bytes

    dev = torch.device(device)
    if dev.type == "cuda":
        return free_gpu_bytes(dev), f"GPU {dev}"

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
