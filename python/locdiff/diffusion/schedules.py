"""Discrete noise schedules, ``get_<name>_schedule(n, ...)`` -> :class:`Schedule`.

Forward process (Ho et al. 2020, Eq. 4): ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``
with ``abar_t = prod_{s<=t} (1 - beta_s)``, timesteps ``t = 0 .. n-1``.

>>> s = get_cosine_schedule(1000)
>>> s.alphas_cumprod.shape, bool(s.alphas_cumprod[0] > 0.99), bool(s.alphas_cumprod[-1] < 1e-3)
(torch.Size([1000]), True, True)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


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
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n (the number of timesteps) must be an int >= 1, got {n!r}")
    return int(n)


def get_linear_schedule(n: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                        max_beta: float = 0.999) -> Schedule:
    """Linear betas (Ho et al. 2020, Sec. 4), rescaled by ``1000 / n`` so that every ``n``
    spans the same signal-to-noise range as the 1000-step original; clipped at ``max_beta``
    as the cosine schedule is (below 20 steps the rescaled betas pass 1, and abar turns
    negative)."""
    n = _check_steps(n)
    scale = 1000.0 / n
    betas = torch.linspace(beta_start * scale, beta_end * scale, n, dtype=torch.float64)
    return _from_betas(betas.clamp(max=max_beta))


def get_cosine_schedule(n: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17):
    ``abar_t = f(t) / f(0)``, ``f(t) = cos(((t/n + s) / (1 + s)) * pi/2)^2``, with betas
    clipped at ``max_beta`` to avoid the singularity at ``t = n``."""
    n = _check_steps(n)
    steps = torch.arange(n + 1, dtype=torch.float64)
    f = torch.cos(((steps / n + s) / (1 + s)) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return _from_betas(betas)


def get_schedule(name: str, n: int) -> Schedule:
    """``"linear"`` or ``"cosine"`` with ``n`` steps."""
    if name == "linear":
        return get_linear_schedule(n)
    if name == "cosine":
        return get_cosine_schedule(n)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {name!r}")
