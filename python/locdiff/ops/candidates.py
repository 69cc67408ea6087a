"""The one candidate policy of decode and top_k: which grid local maxima get refined, and
which refined maxima count as distinct modes. Torch form, any device; the CPU decode runs
its C++ transcription for k = 1 (shdd_decode_refine_cpu), tested against this one.

Refinement order: first the best candidate and, of the first ``nrefine``, those whose grid
value is at least halfway from the mean of f (c_00 Y_00) to the best (the grid spacing
keeps a kernel-shaped lobe's grid value above half its peak). Then, since noisy vectors
have lobes of any shape, every candidate whose grid value plus twice the largest gain of
refinement so far (refined - grid value) still reaches the bar, or that is halfway there,
until none is left. The bar is the k-th highest distinct refined value (-inf while fewer
than k are known), so decode (k = 1) refines what could still be the global maximum and
top_k what could still be among the k best.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


# The degree-L SHDD kernel's first zero lies about FIRST_ZERO / L radians from its point
# (top_k's default separation). A polar ring within POLAR_RING_REACH / L radians of its pole
# spans less than that: it holds at most one mode, and the scans keep only its best maximum
# (docs/kernels.md, "Decode").
FIRST_ZERO = 0.059 * 64
POLAR_RING_REACH = FIRST_ZERO / 2


def one_mode_per_polar_ring(theta: Tensor, degree: int) -> bool:
    """Whether the scans keep one maximum per polar ring of a grid with colatitudes ``theta``
    at ``degree``: where both polar rings lie within POLAR_RING_REACH / degree of their pole."""
    if not theta.numel():
        return False
    reach = max(float(theta[0]), math.pi - float(theta[-1]))
    return reach * max(int(degree), 1) <= POLAR_RING_REACH


def suppress_near(xyz: Tensor, valid: Tensor, cos_sep: float) -> Tensor:
    """Greedy suppression along dim 1 (entries sorted best first): keep an entry if it is
    valid and no kept earlier one lies within the separation (dot >= cos_sep). xyz
    (B, n, 3) unit vectors, valid (B, n) -> keep (B, n). Loops over the valid entries only,
    so padding past the real candidates costs nothing."""
    keep = valid.clone()
    count = int(valid.sum(-1).max()) if valid.numel() else 0
    for j in range(1, count):
        near = ((xyz[:, :j] * xyz[:, j:j + 1]).sum(-1) >= cos_sep) & keep[:, :j]
        keep[:, j] &= ~near.any(-1)
    return keep


def _bar(vals: Tensor, xyz: Tensor, done: Tensor, k: int, cos_sep: float | None) -> Tensor:
    """The k-th highest distinct refined value per row (B, 1); -inf while fewer are known."""
    if k == 1 or cos_sep is None:
        return torch.where(done, vals, -torch.inf).topk(min(k, vals.shape[1]), -1).values[:, -1:]
    v = torch.where(done, vals, -torch.inf)
    v, order = v.sort(-1, descending=True)
    p = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
    keep = suppress_near(p, torch.isfinite(v), cos_sep)
    kept = torch.where(keep, v, -torch.inf).topk(min(k, v.shape[1]), -1).values
    if kept.shape[1] < k:
        return torch.full_like(kept[:, :1], -torch.inf)
    return kept[:, -1:]


def refine_candidates(c64: Tensor, degree: int, value: Tensor, start: Tensor, nrefine: int,
                      refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], k: int = 1,
                      cos_sep: float | None = None) -> tuple[Tensor, Tensor]:
    """Candidates value (B, n) (-inf: none), start xyz (B, n, 3) -> (xyz, refined values)
    best first; values -inf and xyz zero where not refined. ``refine(rows, starts)`` ->
    (unit xyz, f) is the Newton ascent on the coefficient rows ``rows`` of c64."""
    finite = torch.isfinite(value)
    mean = (c64[:, 0] * (0.5 / math.sqrt(math.pi)))[:, None]
    todo = finite & (value >= mean + 0.5 * (value[:, :1] - mean))
    todo[:, nrefine:] = False
    todo[:, 0] = finite[:, 0]
    xyz = start.clone()
    vals = torch.full_like(value, -torch.inf)
    done = torch.zeros_like(finite)
    while bool(todo.any()):
        bi, ci = todo.nonzero(as_tuple=True)
        u, f = refine(bi, start[bi, ci])
        xyz[bi, ci] = u
        vals[bi, ci] = f
        done |= todo
        gain = torch.where(done, vals - value, torch.zeros_like(vals)).amax(-1, keepdim=True).clamp_min(0)
        bar = _bar(vals, xyz, done, k, cos_sep)
        todo = finite & ~done & ((value + 2 * gain >= bar) | (value >= mean + 0.5 * (bar - mean)))
    vals = torch.where(done, vals, -torch.inf)
    xyz = torch.where(done[..., None], xyz, 0.0)
    order = vals.argsort(-1, descending=True)
    return torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3)), torch.gather(vals, 1, order)


def distinct_modes(xyz: Tensor, vals: Tensor, k: int, cos_sep: float) -> tuple[Tensor, Tensor]:
    """The k best of refined maxima (best first, -inf: none) that lie apart by the separation
    -> (xyz (B, k, 3), values (B, k)); rows with fewer distinct modes end in -inf."""
    keep = suppress_near(xyz, torch.isfinite(vals), cos_sep)
    vals = torch.where(keep, vals, -torch.inf)
    n = vals.shape[1]
    top, order = vals.topk(min(k, n), -1)
    xyz = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
    if n < k:
        top = torch.cat([top, top.new_full((top.shape[0], k - n), -torch.inf)], 1)
        xyz = torch.cat([xyz, xyz.new_zeros((xyz.shape[0], k - n, 3))], 1)
    return xyz, top
