"""Pure-torch references for the ``locdiff::shdd_*`` ops (tests only, never the fast path).

Everything is the dense product ``f = c . Y(x)`` over explicit points, with Y from the
pure-torch SH reference (``sh_fn`` may swap in ``locdiff.spherical_harmonics`` at high
degree, where the polynomial reference overflows). O(B x G x K) time, G x K memory.
"""
from __future__ import annotations

import torch

from locdiff.ops.sh_reference import spherical_harmonics_reference


def _degree(coeffs: torch.Tensor) -> int:
    return int(round(coeffs.shape[-1] ** 0.5)) - 1


def shdd_synth_reference(coeffs, xyz, sh_fn=spherical_harmonics_reference):
    """f at points: coeffs (B, K), xyz (G, 3) -> (B, G)."""
    return coeffs @ sh_fn(xyz.to(coeffs.dtype), _degree(coeffs)).T


def shdd_logz_reference(coeffs, xyz, area, temperature=1.0, sh_fn=spherical_harmonics_reference):
    """log sum_i area_i exp(f_i / t) -> (B,)."""
    f = shdd_synth_reference(coeffs, xyz, sh_fn)
    return torch.logsumexp(f / temperature + area.to(f.dtype).log(), -1)


def shdd_kl_reference(pred, target, xyz, area, temperature=1.0, sh_fn=spherical_harmonics_reference):
    """KL(softmax(f_target / t + log a) || softmax(f_pred / t + log a)) per vector -> (B,)."""
    la = area.to(pred.dtype).log()
    lp = torch.log_softmax(shdd_synth_reference(target, xyz, sh_fn) / temperature + la, -1)
    lq = torch.log_softmax(shdd_synth_reference(pred, xyz, sh_fn) / temperature + la, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def shdd_eval_reference(coeffs, xyz, row, sh_fn=spherical_harmonics_reference):
    """f and its gradient w.r.t. xyz at points owned by coefficient rows -> (N,), (N, 3)."""
    with torch.enable_grad():
        x = xyz.detach().to(coeffs.dtype).requires_grad_(True)
        f = (sh_fn(x, _degree(coeffs)) * coeffs[row]).sum(-1)
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g


def decode_naive(coeffs, xyz, y=None, chunk=8192):
    """The naive decode: dense f over a point set, argmax -> (B, 3) best points, (B,) values."""
    if y is None:
        y = spherical_harmonics_reference(xyz.to(coeffs.dtype), _degree(coeffs))
    best_v = torch.full((coeffs.shape[0],), -torch.inf, dtype=coeffs.dtype)
    best_i = torch.zeros(coeffs.shape[0], dtype=torch.int64)
    for g0 in range(0, y.shape[0], chunk):
        v, i = (coeffs @ y[g0:g0 + chunk].T).max(-1)
        take = v > best_v
        best_v = torch.where(take, v, best_v)
        best_i = torch.where(take, i + g0, best_i)
    return xyz[best_i], best_v
