"""The SHDD calls of the library layer (locdiff.shdd, locdiff.grids): one function each,
which picks the implementation for the tensors' device and the backend from
locdiff.ops.registry. Inputs are validated by the caller; a grid arrives as ``GridArgs``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from locdiff.ops import launch
from locdiff.ops.candidates import distinct_modes, refine_candidates, suppress_near
from locdiff.ops.registry import pick
from locdiff.ops.shdd import legendre_table  # noqa: F401  (re-exported for locdiff.grids)
from locdiff.ops.shdd_torch import colatlon_to_xyz

# Newton iterations per refined point (converges in a handful; the cap bounds bad cases).
MAX_ITER = 40


@dataclass(frozen=True)
class GridArgs:
    """What the ops need of a grid, on one device: points (G, 3) and cell areas (G,) in
    float64, the refinement radius (the kernel's half-maximum radius at this degree), and
    ``ring`` = (table, theta, log_area, degree, nlat, nlon, lon0) for ring grids, or
    ``dense(dtype)`` -> Y (G, K) for the others."""
    xyz: Tensor
    area: Tensor
    radius: float
    ring: tuple | None = None
    dense: Callable[[torch.dtype], Tensor] | None = None


def synth(flat: Tensor, grid: GridArgs) -> Tensor:
    """f on every grid point (B, G), differentiable."""
    if grid.ring is not None:
        return pick("shdd_synth", flat.device.type)(flat, *grid.ring)
    return flat @ grid.dense(flat.dtype).T


def values(flat: Tensor, xyz: Tensor, row: Tensor, degree: int) -> Tensor:
    """f of row ``row[i]`` at the unit vector ``xyz[i]`` (N,) float64, fused: no (N, K)
    table of harmonics. Not differentiable."""
    return pick("shdd_eval", flat.device.type)(flat, xyz.double().contiguous(), row.contiguous(), degree)[0]


def analyze(weights: Tensor, grid: GridArgs) -> Tensor:
    """``sum_g w_g Y_k(x_g)`` per row (B, K): the adjoint of :func:`synth`, differentiable."""
    if grid.ring is not None:
        return pick("shdd_adjoint", weights.device.type)(weights.contiguous(), *grid.ring)
    return weights @ grid.dense(weights.dtype)


def log_partition(c: Tensor, grid: GridArgs, inv_temperature: float) -> Tensor:
    """log sum_i area_i exp(f_i / t) per vector (B,) float64, differentiable, fused where
    the device has the kernel (no batch x grid matrix)."""
    if grid.ring is not None:
        return pick("shdd_logz", c.device.type)(c.contiguous(), *grid.ring, inv_temperature)
    la = grid.area.log()
    parts = [torch.logsumexp(synth(c[i:i + 256], grid).double() * inv_temperature + la, -1)
             for i in range(0, c.shape[0], 256)]
    return torch.cat(parts) if parts else c.new_empty((0,), dtype=torch.float64)


def kl_divergence(p: Tensor, q: Tensor, grid: GridArgs, inv_temperature: float) -> Tensor:
    """SHDD-KL per pair (B,) on a ring grid; with gradients, forward and gradient in one pass."""
    launch.one_device("shdd_kl", pred=p, target=q, table=grid.ring[0])
    args = (*grid.ring, inv_temperature)
    if torch.is_grad_enabled() and (p.requires_grad or q.requires_grad):
        return pick("shdd_kl_grad", p.device.type)(p, q, *args, p.requires_grad, q.requires_grad)[0]
    return pick("shdd_kl", p.device.type)(p, q, *args)


def times_pow2(x: Tensor, e: Tensor) -> Tensor:
    """``x * 2^e`` in float64, exact where the result is a normal number: in two halves, so
    that a factor such as 2^1070 (for subnormal rows) never overflows on its own."""
    h = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones(e.shape, dtype=torch.float64, device=x.device)
    return x.double() * torch.ldexp(one, h) * torch.ldexp(one, e - h)


def unit_rows(flat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rows scaled by a power of two to a largest magnitude in [0.5, 1), and the binary
    exponents e (B, 1) that undo it, ``times_pow2(values, e)`` (None: unscaled). Exact, so
    modes and values are unchanged up to the factor, and the float32 grid stage neither
    overflows nor underflows. Rows already within [2^-60, 2^60] are left as they are (no
    float32 risk: docs/conventions.md, "Scale")."""
    big = flat.detach().abs().amax(-1, keepdim=True)
    if flat.numel() == 0 or bool(((big <= 2.0 ** 60) & ((big >= 2.0 ** -60) | (big == 0))).all()):
        return flat, None
    _, e = torch.frexp(big.double())
    e = torch.where(big > 0, e.to(torch.int64), 0)
    return times_pow2(flat, -e).to(flat.dtype).contiguous(), e


def without_constant(flat: Tensor) -> tuple[Tensor, Tensor]:
    """The rows whose constant term dwarfs the rest (|c_00| > 2^8 max |c_k|) with c_00 set
    to 0, and the constant c_00 Y_00 (B, 1) float64 taken out (0 where none was). A constant
    moves no mode, but a large one drowns f's variation in the float32 grid stage
    (tests/test_shdd_edges.py); other rows are left as they are, with no copy."""
    c00 = flat[:, :1].detach()
    big = (c00.abs() > 256.0 * flat[:, 1:].detach().abs().amax(-1, keepdim=True)) if flat.shape[1] > 1 else c00 != 0
    if not bool(big.any()):
        return flat, torch.zeros_like(c00, dtype=torch.float64)
    out = flat.clone()
    out[:, :1] = torch.where(big, 0.0, c00)
    return out, torch.where(big, c00.double(), 0.0) / math.sqrt(4 * math.pi)


def _values_back(vals: Tensor, e: Tensor | None, const: Tensor) -> Tensor:
    """Values of the scaled rows without their constant -> values of the rows given."""
    return (vals if e is None else times_pow2(vals, e)) + const


def candidates(flat: Tensor, grid: GridArgs, ncand: int, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Grid candidates per vector: (value (B, n) float64, start xyz (B, n, 3) float64), -inf
    where missing. Ring grids: the local maxima (registry: shdd_candidates), in float32
    (the grid only picks starting points); other grids: the top grid values in chunks,
    suppressing neighbours within 1.7 half-maximum radii."""
    if grid.ring is not None:
        _, value, start = pick("shdd_candidates", flat.device.type, backend)(flat.float().contiguous(), *grid.ring,
                                                                              ncand)
        return value, colatlon_to_xyz(start)
    cos_sep = math.cos(1.7 * grid.radius)
    step = max(1, (1 << 26) // max(grid.xyz.shape[0], 1))
    values, points = [], []
    for b0 in range(0, flat.shape[0], step):
        f = synth(flat[b0:b0 + step], grid).double()
        v, i = f.topk(min(f.shape[1], 32 * ncand), -1)
        p = grid.xyz[i]  # (b, n, 3)
        v = torch.where(suppress_near(p, torch.isfinite(v), cos_sep), v, -torch.inf)
        v, order = v.topk(min(ncand, v.shape[1]), -1)
        values.append(v)
        points.append(torch.gather(p, 1, order[..., None].expand(-1, -1, 3)))
    return torch.cat(values), torch.cat(points)


def _refine_fn(c64: Tensor, degree: int, radius: float, backend: str | None) -> Callable:
    refine = pick("shdd_refine", c64.device.type, backend)

    def refine_rows(rows: Tensor, xyz: Tensor) -> tuple[Tensor, Tensor]:
        return refine(c64, xyz.contiguous(), rows.contiguous(), degree, radius, MAX_ITER)

    return refine_rows


def ascend(flat: Tensor, xyz: Tensor, degree: int, radius: float, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Newton ascent of each row's f from its start point xyz (B, 3) float64 -> (xyz, f)."""
    flat, const = without_constant(flat)
    flat, e = unit_rows(flat)
    c64 = flat.double()
    rows = torch.arange(flat.shape[0], device=flat.device)
    u, f = _refine_fn(c64, degree, radius, backend)(rows, xyz)
    return u, _values_back(f[:, None], e, const)[:, 0]


def decode(flat: Tensor, grid: GridArgs, degree: int, ncand: int, nrefine: int, refine: bool = True,
           backend: str | None = None) -> tuple[Tensor, Tensor]:
    """-> (xyz (B, ncand, 3), values (B, ncand)) best first; -inf values (and zero vectors
    after refinement) mark gaps. Policy: locdiff.ops.candidates (k = 1)."""
    flat, const = without_constant(flat)
    flat, e = unit_rows(flat)
    if refine and grid.ring is not None:
        xyz, vals = pick("shdd_decode", flat.device.type, backend)(flat, *grid.ring, ncand, grid.radius, nrefine,
                                                                    MAX_ITER)
    else:
        vals, xyz = candidates(flat, grid, ncand, backend)
        if refine:
            c64 = flat.double()
            xyz, vals = refine_candidates(c64, degree, vals, xyz, nrefine, _refine_fn(c64, degree, grid.radius,
                                                                                         backend))
    return xyz, _values_back(vals, e, const)


def top_k(flat: Tensor, grid: GridArgs, degree: int, k: int, cos_sep: float, refine: bool = True,
          backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The k best distinct local maxima -> (xyz (B, k, 3), values (B, k)) best first; past
    the real modes, values -inf (xyz zero). Candidates: 4k + 8 grid maxima; with ``refine``,
    those that can still be among the k best are refined (locdiff.ops.candidates)."""
    flat, const = without_constant(flat)
    flat, e = unit_rows(flat)
    # A side-lobe ring breaks into many grid maxima that can crowd a higher lobe out of a
    # small pool: with 2k + 4, 44 of 1,050 exact SHDDs (L 4-32) lost a mode (docs/kernels.md).
    ncand = 4 * k + 8
    vals, xyz = candidates(flat, grid, ncand, backend)
    if refine:
        c64 = flat.double()
        xyz, vals = refine_candidates(c64, degree, vals, xyz, ncand,
                                      _refine_fn(c64, degree, grid.radius, backend), k=k, cos_sep=cos_sep)
    else:
        order = vals.argsort(-1, descending=True)
        vals = torch.gather(vals, 1, order)
        xyz = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
    xyz, vals = distinct_modes(xyz, vals, k, cos_sep)
    return xyz, _values_back(vals, e, const)
