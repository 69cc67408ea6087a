"""Samplers as plain functions, ``sample_<method>(model, x, schedule, ..., callback=None)``.

``model(x_t, t)`` returns the network's prediction for a batch: the noise (``prediction=
"eps"``), the clean vector (``"x0"``) or the velocity (``"v"``). ``prediction`` has no
default: it must be what the network was trained on (``DiffusionConfig.prediction``), and a
wrong one samples garbage without an error. :func:`guided` builds such a callable
from a conditional network with classifier-free guidance. ``x`` is the starting noise
``x_T ~ N(0, I)``. ``callback``, if given, is called as ``callback(i, t, x, x0)`` after each
step. Everything runs under ``torch.no_grad()``.

>>> from locdiff.diffusion.schedules import get_cosine_schedule
>>> s = get_cosine_schedule(100)
>>> x = sample_ddim(lambda x, t: torch.zeros_like(x), torch.randn(4, 9), s, steps=5, prediction="x0")
>>> float(x.abs().max()) < 1e-6
True
"""
from __future__ import annotations

import numbers

import torch

from locdiff.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def split_prediction(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str):
    """``(x0_hat, eps_hat)`` from a network output, by ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps``
    (Ho et al. 2020, Eq. 4); ``"v"`` is ``v = sqrt(abar) eps - sqrt(1-abar) x0`` (Salimans & Ho
    2022, Sec. 4)."""
    a = abar.reshape(-1, *([1] * (x_t.dim() - 1)))
    if prediction == "eps":
        eps = out
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction == "x0":
        x0 = out
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt().clamp_min(1e-12)
    elif prediction == "v":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        eps = (1 - a).sqrt() * x_t + a.sqrt() * out
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return x0, eps


def guided(net, emb: torch.Tensor | None, guidance: float = 0.0):
    """``model(x, t)`` for a conditional network ``net(x, t, emb, drop=None)`` with
    classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    ``(1 + w) net(x, t, emb) - w net(x, t, null)``; ``w = 0`` is plain conditioning and
    costs one network call per step instead of two."""
    def model(x, t):
        if emb is None or guidance == 0.0:
            return net(x, t, emb)
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, emb]),
                   drop=torch.arange(2 * len(x), device=x.device) >= len(x))
        cond, uncond = both.chunk(2)
        return (1 + guidance) * cond - guidance * uncond
    return model


def _t(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddpm(model, x: torch.Tensor, schedule: Schedule, *, prediction: str,
                generator: torch.Generator | None = None, callback=None):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) through every timestep, using the
    posterior ``q(x_{t-1} | x_t, x0_hat)`` (Eq. 6-7):
    mean ``sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t``,
    variance ``beta_t (1 - abar_{t-1}) / (1 - abar_t)``; no noise is added at t = 0."""
    n = len(schedule)
    for i in reversed(range(n)):
        t = _t(i, x)
        ab, ab_prev = schedule.abar(t, x.dtype), schedule.abar(t - 1, x.dtype)
        beta = (1 - ab / ab_prev)[:, None]
        x0, _ = split_prediction(model(x, t), x, ab, prediction)
        ab, ab_prev = ab[:, None], ab_prev[:, None]
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
        if i > 0:
            var = beta * (1 - ab_prev) / (1 - ab)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + var.sqrt() * noise
        else:
            x = mean
        if callback is not None:
            callback(n - 1 - i, i, x, x0)
    return x


def ddim_timesteps(n: int, steps: int) -> list[int]:
    """``steps`` distinct timesteps from ``n - 1`` down, ``n / steps`` apart ("trailing"
    spacing, so the first step starts from pure noise; Lin et al. 2024, Table 2): with
    ``steps = n`` every timestep once, so DDIM at eta = 1 is DDPM."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an int in [1, {n}], got {steps!r}")
    steps = int(steps)
    return [round(n - k * n / steps) - 1 for k in range(steps)]


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, schedule: Schedule, steps: int = 10, eta: float = 0.0, *,
                prediction: str, generator: torch.Generator | None = None, callback=None):
    """DDIM (Song et al. 2021, Eq. 12) on ``steps`` timesteps ``t_k`` of :func:`ddim_timesteps`:
    ``x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z``,
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)`` (Eq. 16);
    ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like. The last step returns ``x0_hat``.
    ``eta`` must lie in [0, 1]: past 1, sigma^2 exceeds 1 - abar_prev and the step adds more
    noise than the marginal holds."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    ts = ddim_timesteps(len(schedule), steps)
    for k, i in enumerate(ts):
        t = _t(i, x)
        ab = schedule.abar(t, x.dtype)
        x0, eps = split_prediction(model(x, t), x, ab, prediction)
        i_prev = ts[k + 1] if k + 1 < len(ts) else -1
        ab_prev = schedule.abar(_t(i_prev, x), x.dtype)[:, None]
        ab = ab[:, None]
        if i_prev < 0:
            x = x0
        else:
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp_min(0).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(k, i, x, x0)
    return x
