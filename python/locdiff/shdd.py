"""SHDD (spherical-harmonics Dirac delta) vectors: encode points, decode modes, densities and
the SHDD-KL loss.

A point x0 is encoded as ``c_k = Y_k(x0)``, k < (L+1)^2; a vector c describes the function
``f(x) = sum_k c_k Y_k(x)`` whose maximum is the decoded location. Decoding synthesises f on
a ring grid in float32, in chunks of vectors (no batch x grid matrix): Legendre sums per ring
as batched GEMMs, a real FFT per ring, then a local-maximum scan (locdiff.ops.shdd). The best
grid candidates are then refined by a Riemannian trust-region Newton ascent with the analytic
gradient (C++ kernel, float64), to float64 precision.

>>> import numpy as np
>>> c = encode(np.array([48.8566, 2.3522]), 64)
>>> bool(np.abs(decode(c) - [48.8566, 2.3522]).max() < 1e-9)
True
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from locdiff import grids as _grids
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
from locdiff.ops import validation
from locdiff.ops.shdd import (shdd_candidates_op, shdd_decode_op, shdd_eval_op, shdd_kl_grad_op, shdd_kl_op,
                              shdd_logz_op, shdd_refine_op, shdd_synth_op)
from locdiff.sh import spherical_harmonics

REDUCTIONS = ("mean", "sum", "none")


# ---- input handling --------------------------------------------------------------------------
def _to_torch(x, name: str):
    """(tensor, was_numpy)."""
    if isinstance(x, torch.Tensor):
        return x, False
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array or tensor, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(arr)), True


def _out(t: torch.Tensor, numpy: bool):
    return t.detach().cpu().numpy() if numpy else t


def degree_of(k: int) -> int:
    """L for a coefficient length (L+1)^2; ValueError naming k otherwise.

    >>> degree_of(4225)
    64
    """
    n = math.isqrt(max(int(k), 0))
    if k < 1 or n * n != k:
        raise ValueError(f"coefficient length must be a square (L+1)^2, got {k}")
    return n - 1


def _check_coeffs(coeffs, name: str = "coeffs", finite: bool = True):
    """-> (flat (B, K) float32/float64 contiguous, degree, leading shape, was_numpy)."""
    t, numpy = _to_torch(coeffs, name)
    if not t.is_floating_point():
        t = t.double()
    if t.ndim == 0:
        raise ValueError(f"{name} must have shape (..., (L+1)^2), got a scalar")
    degree = degree_of(t.shape[-1])
    if degree > validation.MAX_DEGREE:
        raise ValueError(f"{name}: degree {degree} exceeds {validation.MAX_DEGREE}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    lead = tuple(t.shape[:-1])
    flat = t.reshape(-1, t.shape[-1])
    # A NaN or inf makes the float64 sum non-finite, so a finite sum clears the whole array
    # in one pass with no (B, K) mask (that mask cost decode 100 ms at L = 64, B = 4096); a
    # non-finite sum (or one of huge finite float64 values) gets the element-wise check.
    if finite and flat.numel() and not math.isfinite(float(flat.detach().sum(dtype=torch.float64))):
        ok = torch.isfinite(flat)
        if not bool(ok.all()):
            b, k = (~ok).nonzero()[0].tolist()
            raise ValueError(f"{name} must be finite, got {flat[b, k].item()} at row {b}, index {k}")
    return flat.contiguous(), degree, lead, numpy


def _check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _grid(grid, degree: int) -> _grids.Grid:
    if grid is None:
        return _grids.for_degree(degree)
    if not isinstance(grid, _grids.Grid):
        raise TypeError(f"grid must be a locdiff.grids.Grid or None, got {type(grid).__name__}")
    return grid


def _ring_args(grid: _grids.Grid, degree: int, device):
    table = grid.legendre_table(degree, device)
    theta, log_area = grid.tensors(device, "theta", "log_ring_area")
    return table, theta, log_area, degree, grid.nlat, grid.nlon, grid.lon0


# ---- encode ----------------------------------------------------------------------------------
def smoothing_factors(degree: int, smoothing, dtype=torch.float64, device="cpu") -> torch.Tensor | None:
    """Per-degree multipliers (L+1,) for ``smoothing``: None, a float s >= 0 (the heat kernel
    exp(-l(l+1) s^2 / 2), close to a Gaussian of s radians), or an (L+1,) tensor/array."""
    if smoothing is None:
        return None
    if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool):
        s = float(smoothing)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"smoothing bandwidth must be a finite number >= 0 (radians), got {smoothing!r}")
        l = torch.arange(degree + 1, dtype=torch.float64)
        return torch.exp(-l * (l + 1) * (s * s / 2)).to(dtype=dtype, device=device)
    t, _ = _to_torch(smoothing, "smoothing")
    if t.shape != (degree + 1,):
        raise ValueError(f"smoothing must be a float or a per-degree tensor of shape ({degree + 1},), "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"smoothing factors must be finite, got {t.tolist()}")
    return t.to(dtype=dtype, device=device)


def encode(latlon, degree: int, smoothing=None):
    """SHDD vectors ``c_k = Y_k(x)`` of points ``(..., 2)`` (lat, lon) degrees ->
    ``(..., (degree+1)**2)``; each degree l optionally multiplied by a smoothing factor
    (see ``smoothing_factors``). Numpy in, numpy out; dtype follows the input (float64 for
    integers). Differentiable w.r.t. a latlon tensor.

    >>> encode(np.array([90.0, 0.0]), 1).round(6)
    array([0.282095, 0.      , 0.488603, 0.      ])
    """
    t, numpy = _to_torch(latlon, "latlon")
    degree = validation.check_degree(degree)
    if not t.is_floating_point():
        t = t.double()
    c = spherical_harmonics(latlon_to_xyz(t), degree)
    if smoothing is None:
        return _out(c, numpy)
    if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool):
        w = _heat_kernel_weights(degree, smoothing, c.dtype, c.device)
    else:
        w = _per_coefficient(smoothing_factors(degree, smoothing, dtype=c.dtype, device=c.device), degree)
    return _out(c * w, numpy)


def _per_coefficient(per_degree: torch.Tensor, degree: int) -> torch.Tensor:
    """(L+1,) factors -> ((L+1)^2,): degree l's factor on each of its 2l+1 coefficients."""
    return per_degree.repeat_interleave(2 * torch.arange(degree + 1, device=per_degree.device) + 1)


@functools.lru_cache(maxsize=64)
def _heat_kernel_weights(degree: int, smoothing: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """smoothing_factors for a bandwidth, per coefficient: a training loop encodes its
    targets with one bandwidth every step, and building these took longer than the
    harmonics (40 us against 10 at L = 16). Read-only by use: encode only multiplies by it."""
    return _per_coefficient(smoothing_factors(degree, smoothing, dtype=dtype, device=device), degree)


# ---- grid evaluation --------------------------------------------------------------------------
def grid_values(coeffs, grid=None):
    """f on every grid point: ``(..., K)`` -> ``(..., G)`` (differentiable)."""
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    grid = _grid(grid, degree)
    f = _synth(flat, degree, grid)
    return _out(f.reshape(*lead, grid.size), numpy)


def _synth(flat, degree, grid):
    if grid.is_ring:
        return shdd_synth_op(flat, *_ring_args(grid, degree, flat.device))
    return flat @ grid.sh_table(degree, flat.device, flat.dtype).T


def _grid_value_chunks(flat, degree, grid):
    """f on the grid for consecutive chunks of the vectors, (b, G) each with b G <= 2^26: the
    candidate search off the fused C++ kernels never holds the whole batch x grid matrix."""
    step = max(1, (1 << 26) // max(grid.size, 1))
    for b0 in range(0, flat.shape[0], step):
        yield _synth(flat[b0:b0 + step], degree, grid)


def _evaluate(coeffs64: torch.Tensor, degree: int, xyz: torch.Tensor, rows: torch.Tensor):
    """f and its gradient (w.r.t. the vector as given) at points owned by coefficient rows."""
    if coeffs64.device.type == "cpu":
        return shdd_eval_op(coeffs64, xyz.contiguous(), rows.contiguous(), degree)
    from locdiff.ops.shdd_reference import shdd_eval_reference

    vs, gs = [], []
    step = max(1, (1 << 25) // (degree + 1) ** 2)
    for i in range(0, xyz.shape[0], step):
        v, g = shdd_eval_reference(coeffs64, xyz[i:i + step], rows[i:i + step], sh_fn=spherical_harmonics)
        vs.append(v)
        gs.append(g)
    return torch.cat(vs), torch.cat(gs)


def _candidates(flat, degree, grid, ncand, backend=None):
    """Grid candidates per vector: (value (B,n) float64, start xyz (B,n,3) float64); -inf
    values mark missing candidates. Ring grids: the local maxima, by the fused C++ kernel on
    the CPU, by ring_local_maxima elsewhere, or by the fused Triton kernel (backend="triton");
    other grids: grid values in chunks and the top values, suppressing neighbours."""
    if grid.is_ring and backend == "triton":
        from locdiff.ops.triton.shdd_triton import ring_candidates_triton

        table = grid.legendre_table(degree, flat.device)
        value, index = ring_candidates_triton(flat, table, degree, grid.nlat, grid.nlon, grid.lon0, ncand)
        return value, grid.xyz.to(flat.device)[index]
    if grid.is_ring and flat.device.type == "cpu":
        # float32 whatever the input: the grid only picks starting points (float32 grid
        # values are within ~1e-6 relative, far under the gap that the adaptive choice of
        # candidates leaves), and refinement reads the coefficients in float64.
        _, value, start = shdd_candidates_op(flat.float(), *_ring_args(grid, degree, "cpu"), ncand)
        th, ph = start[..., 0], start[..., 1]
        xyz = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1)
        return value, xyz
    if grid.is_ring:
        return _ring_candidates_torch(flat, degree, grid, ncand)
    gxyz = grid.xyz.to(flat.device)
    sep = math.cos(1.7 * _grids.half_max_radius(degree))
    values, points = [], []
    for f in _grid_value_chunks(flat, degree, grid):
        f = f.double()
        v, i = f.topk(min(grid.size, 32 * ncand), -1)
        p = gxyz[i]  # (b, n, 3)
        # Greedy suppression: keep a value only if no higher kept one lies within ~1.7 r_half.
        keep = torch.zeros_like(v, dtype=torch.bool)
        keep[:, 0] = True
        for j in range(1, v.shape[1]):
            near = ((p[:, :j] @ p[:, j:j + 1].transpose(1, 2)).squeeze(-1) > sep) & keep[:, :j]
            keep[:, j] = ~near.any(-1)
        v = torch.where(keep, v, -torch.inf)
        v, order = v.topk(ncand, -1)
        values.append(v)
        points.append(torch.gather(p, 1, order[..., None].expand(-1, -1, 3)))
    return torch.cat(values), torch.cat(points)


def ring_local_maxima(f: torch.Tensor) -> torch.Tensor:
    """Local maxima of grid values ``f`` (..., nlat, nlon) on a ring grid (bool, same shape),
    as the C++ scan defines them: at least the two neighbours on the ring, and no higher
    value among the three on each adjacent ring; columns wrap at the antimeridian, and the
    ring beyond a pole is the polar ring itself half a turn away. A dozen elementwise ops,
    so that devices without the C++ scan find candidates in a few kernels."""
    half = f.shape[-1] // 2
    up = torch.cat([f[..., :1, :].roll(half, -1), f[..., :-1, :]], -2)
    down = torch.cat([f[..., 1:, :], f[..., -1:, :].roll(half, -1)], -2)
    peak = (f >= f.roll(1, -1)) & (f >= f.roll(-1, -1))
    for ring in (up, down):
        peak &= ~(ring > f) & ~(ring.roll(1, -1) > f) & ~(ring.roll(-1, -1) > f)
    return peak


def _ring_candidates_torch(flat, degree, grid, ncand):
    """_candidates for ring grids off the CPU: grid values in chunks, the local maxima
    (ring_local_maxima), their ncand best -> (value (B, n) float64, grid xyz (B, n, 3))."""
    gxyz = grid.xyz.to(flat.device)
    values, points = [], []
    for f in _grid_value_chunks(flat, degree, grid):
        f = f.view(-1, grid.nlat, grid.nlon)
        masked = torch.where(ring_local_maxima(f), f, -torch.inf).flatten(1)
        v, i = masked.topk(min(ncand, grid.size), -1)
        values.append(v.double())
        points.append(gxyz[i])
    value, start = torch.cat(values), torch.cat(points)
    if value.shape[1] < ncand:  # grids with fewer points than candidates
        pad = ncand - value.shape[1]
        value = torch.cat([value, value.new_full((value.shape[0], pad), -torch.inf)], 1)
        start = torch.cat([start, start[:, :1].expand(-1, pad, -1)], 1)
    return value, start


def _refine(coeffs64, degree, rows, xyz, max_iter: int = 40, backend=None):
    """Trust-region Newton ascent of f on the sphere from ``xyz`` -> (unit xyz, f): the C++
    kernel on the CPU (``locdiff::shdd_refine``), its torch transcription elsewhere, with f
    and its gradient from the SH kernels; backend="triton": the whole loop in one Triton
    kernel (locdiff.ops.triton.refine_triton)."""
    r = _grids.half_max_radius(degree)
    if coeffs64.device.type == "cpu" and backend != "triton":
        return shdd_refine_op(coeffs64, xyz.contiguous(), rows.contiguous(), degree, r, max_iter)
    from locdiff.ops.shdd_reference import shdd_refine_reference

    if backend == "triton":
        from locdiff.ops.triton import refine_triton

        return refine_triton(coeffs64, degree, rows, xyz, r, max_iter)

    def eval_fn(x, rw):
        return _evaluate(coeffs64, degree, x, rw)
    return shdd_refine_reference(coeffs64, degree, rows, xyz, r, max_iter, eval_fn=eval_fn)


# ---- decode, top-k ----------------------------------------------------------------------------
def _decode_points(flat, degree, grid, refine: bool, ncand: int, nrefine: int, backend=None):
    """-> (xyz (B, ncand, 3), values (B, ncand)) best first; -inf values (and zero vectors
    after refinement) mark gaps.

    Which grid local maxima to refine: first up to ``nrefine`` of those whose grid value is
    at least halfway from the mean of f (c_00 Y_00) to the best grid value (the grid spacing
    keeps a kernel-shaped lobe's grid value above half its peak). Then, since noisy vectors
    have lobes of any shape, every candidate whose grid value plus twice the largest gain
    that refinement produced on this vector (refined - grid value) still reaches the best
    refined value is refined too, until none is left.
    """
    if refine and grid.is_ring and flat.device.type == "cpu" and backend != "triton":
        # One op (grid, then one C++ call for the loop below): at small batches the dozens
        # of torch ops it takes cost more than the refinement itself.
        return shdd_decode_op(flat, *_ring_args(grid, degree, "cpu"), ncand, _grids.half_max_radius(degree),
                              nrefine, 40)
    value, start = _candidates(flat, degree, grid, ncand, backend)
    if not refine:
        return start, value
    return _refine_candidates(flat.double(), degree, value, start, nrefine, backend)


def _refine_candidates(c64, degree, value, start, nrefine: int, backend=None):
    """The torch form of shdd_decode_refine (any device): candidates value (B, n), start
    xyz (B, n, 3) -> (xyz, refined values) best first; values -inf, xyz zero where not refined."""
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
        u, f = _refine(c64, degree, bi, start[bi, ci], backend=backend)
        xyz[bi, ci] = u
        vals[bi, ci] = f
        done |= todo
        gain = torch.where(done, vals - value, torch.zeros_like(vals)).amax(-1, keepdim=True).clamp_min(0)
        best = vals.amax(-1, keepdim=True)
        todo = finite & ~done & ((value + 2 * gain >= best) | (value >= mean + 0.5 * (best - mean)))
    vals = torch.where(done, vals, -torch.inf)
    xyz = torch.where(done[..., None], xyz, 0.0)
    order = vals.argsort(-1, descending=True)
    return (torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3)), torch.gather(vals, 1, order))


def decode(coeffs, *, refine: bool = True, grid=None, candidates: int = 4, backend: str | None = None):
    """Location ``(..., 2)`` (lat, lon degrees, float64) of the global maximum of f for SHDD
    vectors ``(..., (L+1)**2)``.

    Grid stage on ``grid`` (default ``grids.for_degree(L)``), then ``refine``: Newton ascent
    to float64 precision from the grid local maxima that can still hold the global maximum
    (first at most ``candidates``, then more while refinement gains say so).
    ``refine=False`` returns the best grid point. ``backend="triton"`` runs the grid stage on
    ring grids as one fused Triton kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1)
    instead of the grid values in chunks and torch ops (see locdiff.ops.triton.shdd_triton),
    and runs each refinement round as one Triton kernel that iterates every point to
    convergence, never forming Y (locdiff.ops.triton.refine_triton).

    >>> c = encode(np.array([[-90.0, 0.0], [10.0, 180.0]]), 32)
    >>> decode(c).round(6).tolist()  # (the longitude of a pole is arbitrary)
    [[-90.0, 0.0], [10.0, 180.0]]
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    grid = _grid(grid, degree)
    validation.check_backend(backend)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    if flat.shape[0] == 0:
        return _out(torch.empty(*lead, 2, dtype=torch.float64, device=flat.device), numpy)
    xyz, _ = _decode_points(flat, degree, grid, refine, max(4 * candidates, 32), candidates, backend)
    latlon = xyz_to_latlon(xyz[:, 0])
    return _out(latlon.reshape(*lead, 2), numpy)


def default_separation_km(degree: int) -> float:
    """Default minimum distance between top-k modes: the first zero of the degree-L kernel
    (about 376 km x 64 / L on Earth)."""
    return 0.059 * 64 / max(degree, 1) * EARTH_RADIUS_KM


def top_k(coeffs, k: int, min_separation_km: float | None = None, *, grid=None, refine: bool = True,
          backend: str | None = None):
    """The ``k`` highest distinct local maxima of f: latlon ``(..., k, 2)`` (float64 degrees)
    and values ``(..., k)``, highest first; modes closer than ``min_separation_km`` to a higher
    one are dropped (default: the kernel's first-zero radius). Missing modes are NaN / -inf.
    ``backend`` as in ``decode``.

    >>> pts = np.array([[0.0, 0.0], [45.0, 90.0]])
    >>> ll, v = top_k(encode(pts, 32).sum(0), 2)
    >>> bool(np.abs(np.sort(ll, 0) - np.sort(pts, 0)).max() < 0.1)  # each lobe shifts the other
    True
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = int(k)
    sep_km = default_separation_km(degree) if min_separation_km is None else float(min_separation_km)
    if not (math.isfinite(sep_km) and sep_km >= 0):
        raise ValueError(f"min_separation_km must be a finite number >= 0, got {min_separation_km!r}")
    grid = _grid(grid, degree)
    validation.check_backend(backend)
    B = flat.shape[0]
    ncand = 2 * k + 4
    if B:
        value, start = _candidates(flat, degree, grid, ncand, backend)
        xyz, vals = start, value
        if refine:
            c64 = flat.double()
            bi, ci = torch.isfinite(value).nonzero(as_tuple=True)
            u, f = _refine(c64, degree, bi, start[bi, ci], backend=backend)
            xyz = start.clone()
            vals = torch.full_like(value, -torch.inf)
            xyz[bi, ci], vals[bi, ci] = u, f
        order = vals.argsort(-1, descending=True)
        vals = torch.gather(vals, 1, order)
        xyz = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
        cos_sep = math.cos(min(sep_km / EARTH_RADIUS_KM, math.pi))
        keep = torch.isfinite(vals)
        for j in range(1, ncand):
            near = ((xyz[:, :j] * xyz[:, j:j + 1]).sum(-1) >= cos_sep) & keep[:, :j]
            keep[:, j] &= ~near.any(-1)
        vals = torch.where(keep, vals, -torch.inf)
        vals, order = vals.topk(min(k, ncand), -1)
        xyz = torch.gather(xyz, 1, order[..., None].expand(-1, -1, 3))
        latlon = xyz_to_latlon(xyz)
        latlon = torch.where(torch.isfinite(vals)[..., None], latlon, torch.nan)
        if k > ncand:  # pragma: no cover - ncand > k always
            raise AssertionError
    else:
        latlon = torch.empty(0, k, 2, dtype=torch.float64)
        vals = torch.empty(0, k, dtype=torch.float64)
    return _out(latlon.reshape(*lead, k, 2), numpy), _out(vals.reshape(*lead, k), numpy)


# ---- densities and the SHDD-KL loss ------------------------------------------------------------
def density(coeffs, grid=None, temperature: float = 1.0):
    """Probability of each grid cell, ``softmax(f / temperature + log area)``: ``(..., K)`` ->
    ``(..., G)`` summing to 1 (differentiable w.r.t. the coefficients).

    >>> p = density(encode(np.array([0.0, 0.0]), 16), temperature=0.1)
    >>> round(float(p.sum()), 9)
    1.0
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    t = _check_temperature(temperature)
    grid = _grid(grid, degree)
    f = _synth(flat, degree, grid)
    la = grid.area.to(device=f.device, dtype=f.dtype).log()
    p = torch.softmax(f / t + la, -1)
    return _out(p.reshape(*lead, grid.size), numpy)


def log_density_at(coeffs, latlon, grid=None, temperature: float = 1.0):
    """log of the density per steradian, ``f(x)/t - log sum_i area_i exp(f_i/t)``, of each
    vector at its point: coeffs ``(..., K)``, latlon ``(..., 2)`` (broadcast) -> ``(...)``
    float64. Fused over the grid (no batch x grid matrix); differentiable w.r.t. coeffs.
    The NLL of a prediction is ``-log_density_at(pred, true_latlon)``.
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    t = _check_temperature(temperature)
    grid = _grid(grid, degree)
    ll, _ = _to_torch(latlon, "latlon")
    ll = ll.to(device=flat.device, dtype=torch.float64)
    validation.check_last_dim(ll, 2, "latlon")
    shape = torch.broadcast_shapes(tuple(lead), tuple(ll.shape[:-1]))
    c = flat.reshape(*lead, -1).expand(*shape, flat.shape[-1]).reshape(-1, flat.shape[-1])
    ll = ll.expand(*shape, 2).reshape(-1, 2)
    y = spherical_harmonics(latlon_to_xyz(ll), degree)
    fx = (c.double() * y).sum(-1)
    if grid.is_ring and c.device.type == "cpu":
        logz = shdd_logz_op(c.contiguous(), *_ring_args(grid, degree, "cpu"), 1.0 / t)
    else:
        la = grid.area.to(device=c.device, dtype=torch.float64).log()
        logz = torch.cat([torch.logsumexp(_synth(c[i:i + 256], degree, grid).double() / t + la, -1)
                          for i in range(0, c.shape[0], 256)]) if c.shape[0] else fx
    return _out((fx / t - logz).reshape(shape), numpy)


def kl_divergence(pred, target, *, grid=None, temperature: float = 1.0, reduction: str = "mean"):
    """SHDD-KL: ``KL(softmax(f_target/t) || softmax(f_pred/t))`` over the cells of a ring grid
    (with their areas), per vector, reduced by ``reduction`` ("mean", "sum", "none").

    The fused op ``locdiff::shdd_kl`` keeps no batch x grid matrix; when either input needs a
    gradient, ``locdiff::shdd_kl_grad`` computes the gradients in the same pass (backward
    only scales them), w.r.t. pred and target. Shapes ``(..., K)``, broadcast.

    >>> c = encode(torch.tensor([[10.0, 20.0]]), 16)
    >>> float(kl_divergence(c, c))
    0.0
    """
    p, degree, lead_p, numpy = _check_coeffs(pred, "pred")
    q, degree_t, lead_t, _ = _check_coeffs(target, "target")
    if degree_t != degree:
        raise ValueError(f"pred and target must have the same length, got {p.shape[-1]} and {q.shape[-1]}")
    t = _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    grid = _grid(grid, degree)
    if not grid.is_ring:
        raise ValueError(f"kl_divergence needs a ring grid (equiangular or gauss_legendre), got {grid.kind}")
    shape = torch.broadcast_shapes(tuple(lead_p), tuple(lead_t))
    dtype = torch.promote_types(p.dtype, q.dtype)
    K = p.shape[-1]
    p = p.to(dtype).reshape(*lead_p, K).expand(*shape, K).reshape(-1, K).contiguous()
    q = q.to(dtype).reshape(*lead_t, K).expand(*shape, K).reshape(-1, K).contiguous()
    args = (*_ring_args(grid, degree, p.device), 1.0 / t)
    if torch.is_grad_enabled() and (p.requires_grad or q.requires_grad):
        kl = shdd_kl_grad_op(p, q, *args, p.requires_grad, q.requires_grad)[0]  # one pass for both
    else:
        kl = shdd_kl_op(p, q, *args)
    kl = kl.reshape(shape)
    if reduction == "mean":
        kl = kl.mean()
    elif reduction == "sum":
        kl = kl.sum()
    return _out(kl, numpy)


__all__ = ["decode", "default_separation_km", "degree_of", "density", "encode", "grid_values",
           "kl_divergence", "log_density_at", "smoothing_factors", "top_k"]
