"""Discrete noise schedules, ``get_<name>_schedule(n, ...)`` -> :class:`Schedule`.

Forward process (Ho et al. 2020, Eq. 4): ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``
with ``abar_t = prod_{s<=t} (1 - beta_s)``, timesteps ``t = 0 .. n-1``.

>>> s = get_cosine_schedule(1000)
>>> s.alphas_cumprod.shape, bool(s.alphas_cumprod[0] > 0.99), bool(s.alphas_cumprod[-1] < 1e-3)
(torch.Size([1000]), True, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from locdiff.ops.validation import check_int


@dataclass
class Schedule:
    """``betas`` and ``alphas_cumprod`` (float64, length n) of a discrete schedule."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __len__(self) -> int:
        return len(self.betas)

    def to(self, device) -> "Schedule":
        return Schedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def abar(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``abar_t`` gathered at integer timesteps ``t`` (any shape) in [-1, n - 1]; ``t = -1``
        gives 1. Not checked, as it is called on every step (the samplers and the loss make
        their own timesteps); t below -1 would wrap around."""
        a = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).to(t.device)
        return a[t.long() + 1].to(dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0)`` with the given standard normal ``noise`` (Eq. 4)."""
        a = self.abar(t, x0.dtype)[:, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _from_betas(betas: torch.Tensor) -> Schedule:
    betas = betas.to(torch.float64)
    return Schedule(betas, torch.cumprod(1 - betas, 0))


def _check_steps(n) -> int:
    return check_int(n, "n (the number of timesteps)")


# The published schedules have 1,000 steps. A schedule of n steps takes n points of the same
# curve from its first step to its last, so that every n spans the same signal-to-noise
# range (abar from 0.9999 down to 4e-5 or less) and n = 1000 is the original; a short
# schedule's last abar stays within float32's reach (docs/model.md, "Noise schedules").
REFERENCE_STEPS = 1000


def _positions(n: int) -> torch.Tensor:
    """Fractional indices into the 1000-step original, 0 .. 999, of the n timesteps (the
    last alone for n = 1)."""
    if n == 1:
        return torch.tensor([REFERENCE_STEPS - 1.0], dtype=torch.float64)
    return (REFERENCE_STEPS - 1) * torch.arange(n, dtype=torch.float64) / (n - 1)


def _from_abar(abar: torch.Tensor, max_beta: float) -> Schedule:
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return _from_betas((1 - abar / prev).clamp(max=max_beta))


def get_linear_schedule(n: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                        max_beta: float = 0.999) -> Schedule:
    """Linear betas from ``beta_start`` to ``beta_end`` over 1000 steps (Ho et al. 2020,
    Sec. 4); other ``n`` take n points of that curve from its first step to its last, log abar
    interpolated between steps, with betas clipped at ``max_beta`` as the cosine schedule's."""
    n = _check_steps(n)
    ref = torch.log1p(-torch.linspace(beta_start, beta_end, REFERENCE_STEPS, dtype=torch.float64)
                      .clamp(max=max_beta)).cumsum(0)
    pos = _positions(n)
    lo = pos.floor().long().clamp(max=REFERENCE_STEPS - 2)
    return _from_abar(torch.lerp(ref[lo], ref[lo + 1], pos - lo).exp(), max_beta)


def get_cosine_schedule(n: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17):
    ``abar(u) = f(u) / f(0)``, ``f(u) = cos(((u + s) / (1 + s)) pi / 2)^2``, at ``u = t / 1000``
    for the 1000 steps t = 1 .. 1000 (other ``n``: n points from the first to the last), with
    betas clipped at ``max_beta`` to avoid the singularity at ``u = 1``."""
    n = _check_steps(n)
    u = torch.cat([torch.zeros(1, dtype=torch.float64), (_positions(n) + 1) / REFERENCE_STEPS])
    f = torch.cos(((u + s) / (1 + s)) * math.pi / 2) ** 2
    return _from_abar(f[1:] / f[0], max_beta)


def get_schedule(name: str, n: int) -> Schedule:
    """``"linear"`` or ``"cosine"`` with ``n`` steps."""
    if name == "linear":
        return get_linear_schedule(n)
    if name == "cosine":
        return get_cosine_schedule(n)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {name!r}")
