"""The LocDiff training loss: ``mse_weight`` * diffusion regression + ``kl_weight`` * SHDD-KL.

The network works on SHDD vectors multiplied by ``scale = sqrt(4 pi)``: an exact SHDD
vector has ``sum_k c_k^2 = (L+1)^2 / (4 pi)``, so the scaled vector has unit mean square per
coefficient at every degree, matching the unit-variance noise of the forward process.

SHDD-KL compares the spherical distributions ``softmax(kappa f / f0)`` that the target and
the predicted clean vector describe, where ``f0 = (L+1)^2 / (4 pi)`` is the peak of an exact
SHDD function, so ``kl_sharpness`` (kappa) is the target's peak in nats above its mean at
every degree. The integrals run on a Gauss-Legendre grid sized by the degree and kappa
(:func:`kl_grid`), fine enough that moving the target point between grid nodes changes
nothing (tests/test_losses.py checks it at L = 32, 64, 128).

>>> cfg = DiffusionConfig(prediction="x0", kl_weight=0.0)  # doctest: +SKIP
>>> loss, parts = diffusion_loss(net, x0, emb, schedule, cfg)  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from locdiff.diffusion.samplers import split_prediction
from locdiff.diffusion.schedules import Schedule, get_schedule


@dataclass
class DiffusionConfig:
    """Diffusion settings.

    ``prediction``: the network predicts ``"eps"``, ``"x0"`` or ``"v"``. ``mse_weight``: the
    regression of that target (Ho et al. 2020, Eq. 14). ``kl_weight``, ``kl_sharpness`` and
    ``kl_grid_oversample``: the SHDD-KL term (module docstring), on the network's density head
    where it has one (a ``density_fraction`` of each batch is drawn at the last timestep, where
    the input is pure noise, so the head learns the distribution of the location given the
    condition alone), else on the predicted clean vector.
    ``smoothing``: heat-kernel bandwidth (radians) of the targets (``locdiff.shdd.encode``;
    None: exact deltas). ``p_uncond``: probability of dropping the condition (classifier-free
    guidance). ``timestep_power``: training timesteps are ``floor(T * u ** p)`` for uniform u;
    1 is uniform, values below 1 train the high noise levels more often."""

    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "x0"
    mse_weight: float = 1.0
    kl_weight: float = 1.0
    kl_sharpness: float = 16.0
    kl_grid_oversample: float = 0.5
    density_fraction: float = 0.5
    smoothing: float | None = None
    p_uncond: float = 0.1
    timestep_power: float = 1.0
    scale: float = math.sqrt(4 * math.pi)

    def __post_init__(self):
        from locdiff.ranges import check_section

        check_section("diffusion", self)  # a SettingError (ValueError) naming the field
        if self.mse_weight == 0 and self.kl_weight == 0:
            raise ValueError("mse_weight and kl_weight are both 0: the loss would be empty")

    def make_schedule(self) -> Schedule:
        return get_schedule(self.schedule, self.timesteps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def kl_temperature(degree: int, sharpness: float) -> float:
    """The absolute temperature ``f0 / kappa`` of :func:`locdiff.shdd.kl_divergence` for a
    sharpness kappa at degree L (``f0 = (L+1)^2 / (4 pi)``, the exact SHDD peak)."""
    from locdiff import shdd

    return shdd.exact_peak(degree) / sharpness


@functools.lru_cache(maxsize=16)
def kl_grid(degree: int, sharpness: float, oversample: float = 0.5):
    """Gauss-Legendre grid for the SHDD-KL at degree L and sharpness kappa. The main lobe of
    ``softmax(kappa f / f0)`` is a Gaussian of about ``std = 1.85 / (L sqrt(kappa))``
    radians; rings ``std / oversample`` apart sample it finely enough that the KL grows
    monotonically with the distance between target and prediction wherever they lie (at
    kappa = 16 that holds from spacing 2 std, oversample 0.5)."""
    from locdiff import grids

    return grids.gauss_legendre(*kl_grid_shape(degree, sharpness, oversample))


def kl_grid_shape(degree: int, sharpness: float, oversample: float = 0.5) -> tuple[int, int]:
    """``(rings, points per ring)`` of :func:`kl_grid`, without building it."""
    from locdiff import grids

    std = 1.85 / ((degree + 1) * math.sqrt(sharpness))
    nlat = max(8, math.ceil(oversample * math.pi / std))
    nlat += nlat % 2
    return nlat, grids.next_pow2(2 * nlat)


def sample_timesteps(b: int, n: int, power: float, device, generator=None) -> torch.Tensor:
    """``floor(n * u ** power)`` for uniform u (power 1: uniform on 0 .. n-1)."""
    if power == 1.0:
        return torch.randint(0, n, (b,), device=device, generator=generator)
    u = torch.rand(b, device=device, generator=generator)
    return (n * u ** power).long().clamp_(0, n - 1)


def shdd_kl(pred: torch.Tensor, target: torch.Tensor, degree: int, cfg: DiffusionConfig,
            reduction: str = "mean") -> torch.Tensor:
    """SHDD-KL of unscaled SHDD vectors (module docstring) with the settings of ``cfg``. A
    non-finite prediction, or one too large for the KL's float64 (a diverging network), gives
    a NaN loss, which the training loop counts and skips, rather than the error
    shdd.kl_divergence raises for such input."""
    from locdiff import shdd

    t = kl_temperature(degree, cfg.kl_sharpness)
    # A NaN or infinity makes its row's bound non-finite: one reduction (one sync) checks both.
    bound = shdd.peak_bound(pred.reshape(-1, pred.shape[-1]), t)
    if not bool((bound <= shdd.KL_MAX_EXPONENT).all()):
        nan = pred.sum() * float("nan")  # keeps the graph: backward runs, the step is skipped
        return nan if reduction != "none" else nan.expand(pred.shape[:-1])
    grid = kl_grid(degree, float(cfg.kl_sharpness), float(cfg.kl_grid_oversample))
    return shdd.kl_divergence(pred, target, grid=grid, temperature=t, reduction=reduction)


def diffusion_loss(net, x0: torch.Tensor, emb: torch.Tensor | None, schedule: Schedule,
                   cfg: DiffusionConfig, generator: torch.Generator | None = None):
    """Loss for a batch of clean SHDD vectors ``x0`` (unscaled, as from ``shdd.encode``) and
    their conditions ``emb``. Returns ``(loss, {"mse": ..., "kl": ...})`` (floats detached).
    """
    b, dev = x0.shape[0], x0.device
    t = sample_timesteps(b, len(schedule), cfg.timestep_power, dev, generator)
    net_cfg = getattr(net, "config", None)
    head = cfg.kl_weight > 0 and getattr(net_cfg, "density_head", False)
    m = max(1, round(cfg.density_fraction * b)) if head else 0
    if head and net_cfg.density_from == "trunk":
        # A head that reads x_t learns the distribution given the condition alone only where
        # x_t is pure noise: its rows are drawn at the last timestep.
        t[:m] = len(schedule) - 1
    noise = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=generator)
    xs = x0 * cfg.scale
    x_t = schedule.q_sample(xs, t, noise)
    drop = None
    if emb is not None and cfg.p_uncond > 0:
        drop = torch.rand(b, device=dev, generator=generator) < cfg.p_uncond
    if head:
        out, dens = net(x_t, t, emb, drop=drop, density_rows=m)
        out = out.float()
    else:
        out = net(x_t, t, emb, drop=drop).float()
    loss, parts = out.new_zeros(()), {}
    if cfg.mse_weight > 0:
        abar = schedule.abar(t, out.dtype)[:, None]
        target = {"eps": noise, "x0": xs, "v": abar.sqrt() * noise - (1 - abar).sqrt() * xs}[cfg.prediction]
        mse = F.mse_loss(out, target)
        loss = loss + cfg.mse_weight * mse
        parts["mse"] = float(mse.detach())
    if head:
        kl = shdd_kl(dens.float() / cfg.scale, x0[:m], math.isqrt(x0.shape[-1]) - 1, cfg)
        loss = loss + cfg.kl_weight * kl
        parts["kl"] = float(kl.detach())
    elif cfg.kl_weight > 0:
        x0_hat, _ = split_prediction(out, x_t, schedule.abar(t, out.dtype), cfg.prediction)
        degree = math.isqrt(x0.shape[-1]) - 1
        if cfg.prediction == "eps":
            # x0 recovered from eps divides by sqrt(abar_t) ~ 0 at large t; weighting by
            # abar_t keeps the KL term on the steps where it carries signal.
            w = schedule.abar(t, out.dtype)
            kl = (w * shdd_kl(x0_hat / cfg.scale, x0, degree, cfg, reduction="none")).mean()
        else:
            kl = shdd_kl(x0_hat / cfg.scale, x0, degree, cfg)
        loss = loss + cfg.kl_weight * kl
        parts["kl"] = float(kl.detach())
    return loss, parts
