"""The SHDD ops without a compiled kernel on a device, composed of torch ops and the kernels
that do exist there (the CUDA synthesis and spherical harmonics). Each takes and returns
what the op of the same name in locdiff.ops.shdd does, so the registry can list it as that
op's row for the device."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from locdiff.ops.candidates import one_mode_per_polar_ring, refine_candidates
from locdiff.ops.sh import spherical_harmonics_op
from locdiff.ops.shdd import shdd_synth_op
from locdiff.ops.shdd_reference import shdd_eval_reference, shdd_hessian_reference, shdd_refine_reference

# Grid values per chunk: b G <= 2^26, so no batch x grid matrix is formed at once.
_CHUNK_VALUES = 1 << 26


def _chunks(coeffs: Tensor, size: int):
    step = max(1, _CHUNK_VALUES // max(size, 1))
    for b0 in range(0, coeffs.shape[0], step):
        yield coeffs[b0:b0 + step]


def ring_local_maxima(f: Tensor, one_per_polar_ring: bool = False) -> Tensor:
    """Local maxima of grid values ``f`` (..., nlat, nlon) on a ring grid (bool, same shape),
    as the C++ scan defines them: at least the two neighbours on the ring, and no higher
    value among the three on each adjacent ring; columns wrap at the antimeridian, and the
    ring beyond a pole is the polar ring itself half a turn away; with ``one_per_polar_ring``
    a polar ring keeps only its best maximum (the last of equals; candidates.
    one_mode_per_polar_ring). A dozen elementwise ops, so that devices without the C++ scan
    find candidates in a few kernels."""
    half = f.shape[-1] // 2
    up = torch.cat([f[..., :1, :].roll(half, -1), f[..., :-1, :]], -2)
    down = torch.cat([f[..., 1:, :], f[..., -1:, :].roll(half, -1)], -2)
    peak = (f >= f.roll(1, -1)) & (f >= f.roll(-1, -1))
    for ring in (up, down):
        peak &= ~(ring > f) & ~(ring.roll(1, -1) > f) & ~(ring.roll(-1, -1) > f)
    for j in ({0, f.shape[-2] - 1} if one_per_polar_ring else ()):
        masked = torch.where(peak[..., j, :], f[..., j, :], -torch.inf)
        n = masked.shape[-1]
        best = n - 1 - masked.flip(-1).argmax(-1, keepdim=True)  # the last of equals
        peak[..., j, :] &= torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, best, True)
    return peak


def candidates(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int, nlon: int,
               lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    """shdd_candidates: grid values in chunks, their local maxima, the ncand best; start is
    the grid point (colatitude, longitude)."""
    ring = (table, theta, log_area, degree, nlat, nlon, lon0)
    polar = one_mode_per_polar_ring(theta, degree)
    values, indices = [], []
    for c in _chunks(coeffs, nlat * nlon):
        f = shdd_synth_op(c, *ring).view(-1, nlat, nlon)
        masked = torch.where(ring_local_maxima(f, polar), f, -torch.inf).flatten(1)
        v, i = masked.topk(min(ncand, nlat * nlon), -1)
        values.append(v.double())
        indices.append(i)
    value = torch.cat(values) if values else coeffs.new_empty((0, min(ncand, nlat * nlon)), dtype=torch.float64)
    index = torch.cat(indices) if indices else value.new_empty(value.shape, dtype=torch.int64)
    if value.shape[1] < ncand:  # grids with fewer points than candidates
        pad = ncand - value.shape[1]
        value = torch.cat([value, value.new_full((value.shape[0], pad), -torch.inf)], 1)
        index = torch.cat([index, index[:, :1].expand(-1, pad)], 1)
    lon = lon0 + 2 * math.pi * (index % nlon).to(torch.float64) / nlon  # as the grid's own points
    return index, value, torch.stack([theta[index // nlon], lon], -1)


def logz(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int, nlon: int,
         lon0: float, inv_temperature: float) -> Tensor:
    """shdd_logz: log sum_i area_i exp(f_i / t) per vector, float64, in chunks of vectors."""
    ring = (table, theta, log_area, degree, nlat, nlon, lon0)
    la = log_area.repeat_interleave(nlon)
    parts = [torch.logsumexp(shdd_synth_op(c, *ring).double() * inv_temperature + la, -1)
             for c in _chunks(coeffs, nlat * nlon)]
    return torch.cat(parts) if parts else coeffs.new_empty((0,), dtype=torch.float64)


def evaluate(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    """shdd_eval: f and its gradient at points, by autograd through the SH op, in chunks."""
    c64 = coeffs.double()
    vs, gs = [], []
    step = max(1, (1 << 25) // (degree + 1) ** 2)
    for i in range(0, xyz.shape[0], step):
        v, g = shdd_eval_reference(c64, xyz[i:i + step], row[i:i + step], sh_fn=spherical_harmonics_op)
        vs.append(v)
        gs.append(g)
    if not vs:
        return xyz.new_empty((0,), dtype=torch.float64), xyz.new_empty((0, 3), dtype=torch.float64)
    return torch.cat(vs), torch.cat(gs)


def hessian(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> Tensor:
    """shdd_hessian by double autograd through the SH op."""
    return shdd_hessian_reference(coeffs.double(), xyz.double(), row, sh_fn=spherical_harmonics_op)


def refine(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int, radius: float,
           max_iter: int) -> tuple[Tensor, Tensor]:
    """shdd_refine: the C++ kernel's Newton ascent transcribed in torch ops."""
    c64 = coeffs.double()
    return shdd_refine_reference(c64, degree, row, xyz.double(), radius, max_iter,
                                 eval_fn=lambda x, rw: evaluate(c64, x, rw, degree))


def colatlon_to_xyz(start: Tensor) -> Tensor:
    """(..., 2) (colatitude, longitude) radians -> (..., 3) unit vectors."""
    th, ph = start[..., 0], start[..., 1]
    return torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1)


def decode_refine_with(refine_fn: Callable) -> Callable:
    """shdd_decode_refine over a refinement of shdd_refine's signature."""

    def decode_refine(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float, nrefine: int,
                      max_iter: int) -> tuple[Tensor, Tensor]:
        c64 = coeffs.double().contiguous()

        def refine_rows(rows, xyz):
            return refine_fn(c64, xyz.contiguous(), rows.contiguous(), degree, radius, max_iter)

        return refine_candidates(c64, degree, value, colatlon_to_xyz(start), nrefine, refine_rows)

    return decode_refine


def decode_with(candidates_fn: Callable, refine_fn: Callable) -> Callable:
    """shdd_decode over a candidate search and a refinement of those ops' signatures."""
    decode_refine = decode_refine_with(refine_fn)

    def decode(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int, nlon: int,
               lon0: float, ncand: int, radius: float, nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
        # float32 grid whatever the input, as the CPU op (docs/kernels.md, "Decode").
        _, value, start = candidates_fn(coeffs.float().contiguous(), table, theta, log_area, degree, nlat, nlon,
                                        lon0, ncand)
        return decode_refine(coeffs, value, start, degree, radius, nrefine, max_iter)

    return decode


# The composed rows of the registry; the Triton ones import Triton on first call.
decode_refine_native = decode_refine_with(refine)
decode_native = decode_with(candidates, refine)


def decode_refine_triton(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float, nrefine: int,
                         max_iter: int) -> tuple[Tensor, Tensor]:
    from locdiff.ops.triton.refine import shdd_refine_triton_op

    return decode_refine_with(shdd_refine_triton_op)(coeffs, value, start, degree, radius, nrefine, max_iter)


def decode_triton(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int, nlon: int,
                  lon0: float, ncand: int, radius: float, nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
    from locdiff.ops.triton.refine import shdd_refine_triton_op
    from locdiff.ops.triton.shdd_triton import shdd_candidates_triton_op

    return decode_with(shdd_candidates_triton_op, shdd_refine_triton_op)(
        coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand, radius, nrefine, max_iter)
