"""SHDD (spherical-harmonics Dirac delta) vectors: encode points, decode modes, densities and
the SHDD-KL loss.

A point x0 is encoded as ``c_k = Y_k(x0)``, k < (L+1)^2; a vector c describes the function
``f(x) = sum_k c_k Y_k(x)`` whose maximum is the decoded location. Decoding synthesises f on
a ring grid in float32 (rows scaled by a power of two first, so that no scale overflows it),
without a batch x grid matrix, then keeps its local maxima; the best grid candidates are
refined by a Riemannian trust-region Newton ascent with the analytic gradient, in float64.
Which kernel runs on which device and backend: locdiff.ops.registry (docs/kernels.md).

>>> import numpy as np
>>> c = encode(np.array([48.8566, 2.3522]), 64)
>>> bool(np.abs(decode(c) - [48.8566, 2.3522]).max() < 1e-9)
True
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from locdiff import grids
from locdiff.geo import EARTH_RADIUS_KM, cos_of_km, latlon_to_xyz, xyz_to_latlon
from locdiff.ops import shdd_api, validation
from locdiff.ops.candidates import FIRST_ZERO
from locdiff.sh import spherical_harmonics

REDUCTIONS = ("mean", "sum", "none")


# ---- input handling --------------------------------------------------------------------------
def _to_torch(x, name: str):
    """(tensor, was_numpy)."""
    if isinstance(x, torch.Tensor):
        validation.check_device_type(x.device, f"{name} is on {x.device}")
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"{name} must be a real numeric array or tensor, got dtype {x.dtype}")
        validation.check_no_forward_ad(x, name)
        return x, False
    arr = validation.native_array(np.asarray(x), name, "fiu", "a real numeric array or tensor")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    # (ascontiguousarray would turn a 0-d array into a 1-d one)
    return torch.from_numpy(np.array(arr, copy=not arr.flags.c_contiguous, order="C")), True


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


def _check_coeffs(coeffs, name: str = "coeffs"):
    """-> (flat (B, K) float32/float64 contiguous, degree, leading shape, was_numpy)."""
    t, numpy = _to_torch(coeffs, name)
    if not t.is_floating_point():
        t = t.double()
    if t.ndim == 0:
        raise ValueError(f"{name} must have shape (..., (L+1)^2), got a scalar")
    try:
        degree = degree_of(t.shape[-1])
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if degree > validation.MAX_DEGREE:
        raise ValueError(f"{name}: degree {degree} exceeds {validation.MAX_DEGREE}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    lead = tuple(t.shape[:-1])
    flat = t.reshape(-1, t.shape[-1])
    # A NaN or inf makes the float64 sum non-finite, so a finite sum clears the whole array
    # in one pass with no (B, K) mask (a mask costs a large decode a visible share); a
    # non-finite sum (or one of huge finite float64 values) gets the element-wise check.
    if flat.numel() and not math.isfinite(float(flat.detach().sum(dtype=torch.float64))):
        ok = torch.isfinite(flat)
        if not bool(ok.all()):
            b, k = (~ok).nonzero()[0].tolist()
            raise ValueError(f"{name} must be finite, got {flat[b, k].item()} at row {b}, index {k}")
    return flat.contiguous(), degree, lead, numpy


def checked_coefficients(coeffs, name: str = "coeffs") -> torch.Tensor:
    """``coeffs`` (..., (L+1)^2) as a float32 / float64 torch tensor, checked as every function
    here checks its vectors: real numbers (half precision in float32), a square count, finite
    values (a NaN or infinity named by row and index)."""
    flat, _, lead, _ = _check_coeffs(coeffs, name)
    return flat.reshape(*lead, flat.shape[-1])


def _check_has_modes(flat: torch.Tensor) -> None:
    """A row with no coefficient of degree >= 1 is a constant function: every point is its
    maximum, so a decoded point would be an artefact of the grid's first node."""
    flat_rows = ~flat[:, 1:].detach().any(-1)
    if flat.shape[0] and bool(flat_rows.any()):
        b = int(flat_rows.nonzero()[0, 0])
        raise ValueError(f"coeffs row {b} describes a constant function (every coefficient of degree >= 1 is "
                         f"zero), which has no mode; expected a vector with some degree >= 1 content")


# Below this, f / t outgrows the float64 precision that the log-partition's cancellation
# needs (absolute error ~ 1e-16 max|f| / t; NaN once that reaches exp's range).
MIN_TEMPERATURE = 1e-6


def exact_peak(degree: int) -> float:
    """The value of an exact SHDD's function at its point, ``(L+1)^2 / (4 pi)``: over a
    temperature t, the sharpness of its density ``softmax(f / t)``."""
    return (degree + 1) ** 2 / (4 * math.pi)


def check_temperature(temperature) -> float:
    """``temperature`` as a float; a TypeError naming it unless a real number, a ValueError
    unless finite and >= MIN_TEMPERATURE."""
    if isinstance(temperature, (str, bytes, bool)) or not isinstance(temperature, (numbers.Real, np.ndarray,
                                                                                     torch.Tensor)):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a real number, got {temperature!r}") from None
    if not (math.isfinite(t) and t >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (float64 precision of "
                         f"f / temperature), got {temperature!r}")
    return t


def _broadcast(a, b, name_a: str, name_b: str) -> tuple:
    """The broadcast of two batch shapes; ValueError naming both when they do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))
    except RuntimeError:
        raise ValueError(f"{name_a} batch shape {tuple(a)} and {name_b} batch shape {tuple(b)} do not broadcast; "
                         f"expected equal shapes, or 1 where one of them repeats") from None


# Normalisers integrate exp(f / t), whose lobe is sharper than f's by sqrt(peak / t): on
# the decode grid the log of an exact SHDD's at sharpness 16 is 0.5-0.9 nats off, and 4x
# grids fall behind past sharpness 40 (0.5 nats at 100, 18 at 1000). The default grid takes
# Gauss-Legendre rings at max(4, 0.65 sqrt(sharpness)) x the decode resolution (within
# 0.04 nats to sharpness 1000), rounded up on a ladder so that grids are reused, and at
# most NORMALIZER_MAX_CELLS cells (docs/model.md, "Densities").
NORMALIZER_OVERSAMPLE = 4.0
NORMALIZER_LADDER = (4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 40.0)
NORMALIZER_MAX_CELLS = 1 << 22
NORMALIZER_KIND = "gauss_legendre"


def _normalizer_grid(grid, degree: int, t: float, *coeffs: torch.Tensor) -> grids.Grid:
    """``grid``, or the default grid of the normalisers for the sharpest row of ``coeffs``."""
    if grid is not None:
        return _grid(grid, degree)
    peak = max((float(peak_bound(c, t).max()) for c in coeffs if c.numel()), default=0.0)
    want = max(NORMALIZER_OVERSAMPLE, 0.65 * math.sqrt(peak))
    fitting = _normalizer_oversamples(degree)
    chosen = next((o for o in fitting if o >= want), fitting[-1])
    return grids.for_degree(degree, NORMALIZER_KIND, oversample=chosen)


def _normalizer_oversamples(degree: int) -> tuple:
    """The steps of NORMALIZER_LADDER whose grids stay within NORMALIZER_MAX_CELLS at
    ``degree`` (the first step always)."""
    fitting = [o for o in NORMALIZER_LADDER if math.prod(grids.ring_shape(degree, o)) <= NORMALIZER_MAX_CELLS]
    return tuple(fitting) or NORMALIZER_LADDER[:1]


def normalizer_max_sharpness(degree: int) -> float:
    """The sharpness f0 / t up to which the default normaliser grid follows an exact SHDD's
    lobe at ``degree``: past it the grid stops at NORMALIZER_MAX_CELLS, the normaliser
    comes out too small and NLLs too low (docs/model.md, "Densities")."""
    return (_normalizer_oversamples(degree)[-1] / 0.65) ** 2


def _grid(grid, degree: int) -> grids.Grid:
    """``grid``, checked, or the decode grid of degree ``degree`` where it is None."""
    if grid is None:
        return grids.for_degree(degree)
    if not isinstance(grid, grids.Grid):
        raise TypeError(f"grid must be a locdiff.grids.Grid or None, got {type(grid).__name__}")
    return grid


def _pairs(flat: torch.Tensor, lead: tuple, latlon) -> tuple:
    """Coefficient rows and points broadcast against each other: (c (n, K), latlon (n, 2)
    float64 on c's device, broadcast shape)."""
    ll, _ = _to_torch(latlon, "latlon")
    ll = ll.to(device=flat.device, dtype=torch.float64)
    validation.check_last_dim(ll, 2, "latlon")
    shape = _broadcast(lead, ll.shape[:-1], "coeffs", "latlon")
    K = flat.shape[-1]
    c = flat.reshape(*lead, K).expand(*shape, K).reshape(-1, K)
    return c, ll.expand(*shape, 2).reshape(-1, 2), shape


def _grid_args(grid: grids.Grid, degree: int, device) -> shdd_api.GridArgs:
    device = torch.device(device)
    xyz, area = grid.tensors(device, "xyz", "area")
    ring = None
    if grid.is_ring:
        table = grid.legendre_table(degree, device)
        theta, log_area = grid.tensors(device, "theta", "log_ring_area")
        ring = (table, theta, log_area, degree, grid.nlat, grid.nlon, grid.lon0)
    return shdd_api.GridArgs(xyz=xyz, area=area, radius=grids.half_max_radius(degree), ring=ring,
                             dense=functools.partial(grid.sh_table, degree, device))


# ---- encode ----------------------------------------------------------------------------------
def smoothing_factors(degree: int, smoothing, dtype=torch.float64, device="cpu") -> torch.Tensor | None:
    """Per-degree multipliers (L+1,) for ``smoothing``: None, a float s >= 0 (the heat kernel
    exp(-l(l+1) s^2 / 2), close to a Gaussian of s radians), or an (L+1,) tensor/array."""
    device = validation.check_device(device)
    if smoothing is None:
        return None
    if _is_bandwidth(smoothing):
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
    if _is_bandwidth(smoothing):
        w = _heat_kernel_weights(degree, float(smoothing), c.dtype, c.device)
    else:
        w = _per_coefficient(smoothing_factors(degree, smoothing, dtype=c.dtype, device=c.device), degree)
    return _out(c * w, numpy)


def _is_bandwidth(smoothing) -> bool:
    """A heat-kernel bandwidth (a real scalar, numpy's included), not per-degree factors."""
    return isinstance(smoothing, (int, float, np.integer, np.floating)) and not isinstance(smoothing, bool)


def _per_coefficient(per_degree: torch.Tensor, degree: int) -> torch.Tensor:
    """(L+1,) factors -> ((L+1)^2,): degree l's factor on each of its 2l+1 coefficients."""
    return per_degree.repeat_interleave(2 * torch.arange(degree + 1, device=per_degree.device) + 1)


@functools.lru_cache(maxsize=64)
def _heat_kernel_weights(degree: int, smoothing: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """smoothing_factors for a bandwidth, per coefficient, cached: a training loop encodes its
    targets with one bandwidth every step. Read-only by use: encode only multiplies by it."""
    return _per_coefficient(smoothing_factors(degree, smoothing, dtype=dtype, device=device), degree)


# ---- grid evaluation --------------------------------------------------------------------------
def grid_values(coeffs, grid=None):
    """f on every grid point: ``(..., K)`` -> ``(..., G)`` (differentiable)."""
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    grid = _grid(grid, degree)
    f = shdd_api.synth(flat, _grid_args(grid, degree, flat.device))
    return _out(f.reshape(*lead, grid.size), numpy)


def project(weights, degree: int, grid):
    """The degree-``degree`` spherical-harmonic coefficients of a distribution given as
    probabilities of the cells of ``grid``: ``sum_g w_g Y_k(x_g)``, ``(..., G)`` ->
    ``(..., (degree+1)^2)`` (differentiable). ``project(density(c, g, t), L, g)`` is the
    density band-limited to degree L, whose mode is the point with the most probability
    nearby (the density smoothed by the degree-L kernel), unlike the mode of f.

    >>> g = grids.for_degree(8, oversample=4)
    >>> c = encode(np.array([20.0, 30.0]), 8)
    >>> decode(project(density(c, g, 1.0), 8, g)).round(1).tolist()
    [20.0, 30.0]
    """
    degree = validation.check_degree(degree)
    if not isinstance(grid, grids.Grid):
        raise TypeError(f"grid must be a locdiff.grids.Grid, got {type(grid).__name__}")
    w, numpy = _to_torch(weights, "weights")
    if w.ndim == 0 or w.shape[-1] != grid.size:
        raise ValueError(f"weights must have shape (..., {grid.size}) for this grid, got {tuple(w.shape)}")
    if not w.is_floating_point():
        w = w.double()
    elif w.dtype not in (torch.float32, torch.float64):  # half precision: in float32, as coeffs are
        w = w.float()
    lead = tuple(w.shape[:-1])
    flat = w.reshape(-1, grid.size)
    c = shdd_api.analyze(flat, _grid_args(grid, degree, flat.device)) if flat.shape[0] else \
        flat.new_zeros((0, (degree + 1) ** 2))
    return _out(c.reshape(*lead, (degree + 1) ** 2), numpy)


# ---- decode, top-k ----------------------------------------------------------------------------
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
    convergence, never forming Y (locdiff.ops.triton.refine).

    >>> c = encode(np.array([[-90.0, 0.0], [10.0, 180.0]]), 32)
    >>> (decode(c).round(6) + 0.0).tolist()  # (the longitude of a pole is arbitrary)
    [[-90.0, 0.0], [10.0, 180.0]]
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    grid = _grid(grid, degree)
    validation.check_backend(backend)
    candidates = validation.check_int(candidates, "candidates")
    if flat.shape[0] == 0:
        return _out(torch.empty(*lead, 2, dtype=torch.float64, device=flat.device), numpy)
    _check_has_modes(flat)
    xyz, _ = shdd_api.decode(flat, _grid_args(grid, degree, flat.device), degree, max(4 * candidates, 32),
                             candidates, refine, backend)
    latlon = xyz_to_latlon(xyz[:, 0]).detach()  # a search's result: not differentiable
    return _out(latlon.reshape(*lead, 2), numpy)


def ascend(coeffs, latlon, *, backend: str | None = None):
    """The local maximum of f that Newton ascent on the sphere reaches from each start point:
    coeffs ``(..., K)``, latlon ``(..., 2)`` (broadcast) -> (latlon ``(..., 2)`` float64,
    values ``(...)``). With a smoothed or truncated copy of a vector, ``decode`` then
    ``ascend`` on the full vector finds the fine mode inside the coarse mode's basin.

    >>> c = encode(np.array([10.0, 20.0]), 32)
    >>> ascend(c, np.array([11.0, 21.0]))[0].round(6).tolist()
    [10.0, 20.0]
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    validation.check_backend(backend)
    c, ll, shape = _pairs(flat, lead, latlon)
    c = c.contiguous()
    xyz = latlon_to_xyz(ll)
    if c.shape[0] == 0:
        return (_out(torch.empty(*shape, 2, dtype=torch.float64), numpy),
                _out(torch.empty(shape, dtype=torch.float64), numpy))
    u, f = shdd_api.ascend(c, xyz.contiguous(), degree, grids.half_max_radius(degree), backend)
    return _out(xyz_to_latlon(u).reshape(*shape, 2).detach(), numpy), _out(f.reshape(shape).detach(), numpy)


def default_separation_km(degree: int) -> float:
    """Default minimum distance between top-k modes: the first zero of the degree-L kernel
    (about 376 km x 64 / L on Earth)."""
    return FIRST_ZERO / max(degree, 1) * EARTH_RADIUS_KM


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
    k = validation.check_int(k, "k")
    if min_separation_km is not None and (isinstance(min_separation_km, (str, bytes, bool))
                                          or not isinstance(min_separation_km, numbers.Real)):
        raise TypeError(f"min_separation_km must be a real number or None, got {min_separation_km!r}")
    sep_km = default_separation_km(degree) if min_separation_km is None else float(min_separation_km)
    if not (math.isfinite(sep_km) and sep_km >= 0):
        raise ValueError(f"min_separation_km must be a finite number >= 0, got {min_separation_km!r}")
    grid = _grid(grid, degree)
    validation.check_backend(backend)
    if flat.shape[0]:
        _check_has_modes(flat)
        # Each of the 4k + 8 candidates holds about eight float64 numbers on the way.
        validation.check_allocation((flat.shape[0], 4 * k + 8, 8), torch.float64, flat.device,
                                    f"top_k's candidates for k = {k}", "ask for fewer modes (k)")
        cos_sep = cos_of_km(sep_km)
        xyz, vals = shdd_api.top_k(flat, _grid_args(grid, degree, flat.device), degree, k, cos_sep, refine, backend)
        # A value can overflow to +inf at a real mode (coefficients near 1e307); -inf marks none.
        latlon = torch.where((vals > -torch.inf)[..., None], xyz_to_latlon(xyz), torch.nan)
    else:
        latlon = torch.empty(0, k, 2, dtype=torch.float64, device=flat.device)
        vals = torch.empty(0, k, dtype=torch.float64, device=flat.device)
    return _out(latlon.reshape(*lead, k, 2).detach(), numpy), _out(vals.reshape(*lead, k).detach(), numpy)


# ---- densities and the SHDD-KL loss ------------------------------------------------------------
def density(coeffs, grid=None, temperature: float = 1.0):
    """Probability of each grid cell, ``softmax(f / temperature + log area)``: ``(..., K)`` ->
    ``(..., G)`` summing to 1 (differentiable w.r.t. the coefficients).

    >>> p = density(encode(np.array([0.0, 0.0]), 16), temperature=0.1)
    >>> round(float(p.sum()), 9)
    1.0
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    t = check_temperature(temperature)
    grid = _grid(grid, degree)
    # The values, then the softmax's: a large batch at a high degree fails here in words.
    validation.check_allocation((3, flat.shape[0], grid.size), flat.dtype, flat.device, "density",
                                "use fewer rows at a time, a lower degree or a coarser grid")
    f = shdd_api.synth(flat, _grid_args(grid, degree, flat.device))
    la = grid.area.to(device=f.device, dtype=f.dtype).log()
    p = torch.softmax(f / t + la, -1)
    return _out(p.reshape(*lead, grid.size), numpy)


def values_at(coeffs, latlon):
    """f(x) = sum_k c_k Y_k(x) of each vector at its point(s): coeffs ``(..., K)``, latlon
    ``(..., 2)`` (broadcast) -> ``(...)`` float64, differentiable w.r.t. coeffs and latlon.

    >>> c = encode(np.array([0.0, 0.0]), 8)
    >>> round(float(values_at(c, np.array([0.0, 0.0]))), 6) == round(81 / (4 * math.pi), 6)
    True
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    if torch.is_grad_enabled() and (flat.requires_grad or (torch.is_tensor(latlon) and latlon.requires_grad)):
        c, ll, shape = _pairs(flat, lead, latlon)
        y = spherical_harmonics(latlon_to_xyz(ll), degree)
        return _out((c.double() * y).sum(-1).reshape(shape), numpy)
    # Without a gradient, the fused kernel evaluates each point against its own row, with
    # no (N, K) copies of the rows and the harmonics (gigabytes for many points at L >= 64).
    rows = torch.arange(flat.shape[0], device=flat.device).reshape(lead)
    row, ll, shape = _pairs(rows[..., None], lead, latlon)
    return _out(shdd_api.values(flat, latlon_to_xyz(ll), row[:, 0], degree).reshape(shape), numpy)


def log_normalizer(coeffs, grid=None, temperature: float = 1.0):
    """``log sum_i area_i exp(f_i / t)`` over the grid cells (the log partition function of
    the density ``exp(f / t)`` per steradian): ``(..., K)`` -> ``(...)`` float64, fused over
    the grid, differentiable w.r.t. coeffs. The default grid: Gauss-Legendre rings at
    ``max(4, 0.65 sqrt(sharpness))`` x the decode grid's resolution, where the sharpness
    bounds the rows' peak over t (NORMALIZER_*)."""
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    t = check_temperature(temperature)
    grid = _normalizer_grid(grid, degree, t, flat)
    logz = shdd_api.log_partition(flat, _grid_args(grid, degree, flat.device), 1.0 / t)
    return _out(logz.reshape(lead), numpy)


def log_density_at(coeffs, latlon, grid=None, temperature: float = 1.0):
    """log of the density per steradian, ``f(x)/t - log sum_i area_i exp(f_i/t)``, of each
    vector at its point: coeffs ``(..., K)``, latlon ``(..., 2)`` (broadcast) -> ``(...)``
    float64. Fused over the grid (no batch x grid matrix); differentiable w.r.t. coeffs and
    latlon. The NLL of a prediction is ``-log_density_at(pred, true_latlon)``. The default grid is
    :func:`log_normalizer`'s.
    """
    flat, degree, lead, numpy = _check_coeffs(coeffs)
    t = check_temperature(temperature)
    grid = _normalizer_grid(grid, degree, t, flat)
    c, ll, shape = _pairs(flat, lead, latlon)
    fx = values_at(c, ll)
    logz = shdd_api.log_partition(c, _grid_args(grid, degree, c.device), 1.0 / t)
    return _out((fx / t - logz).reshape(shape), numpy)


# |f| / t at most this, for the KL: its terms f/t and log Z cancel, so float64 keeps about
# 1e-16 |f| / t of it; past 1e12 (1e-4 nats) it went negative (tests/test_shdd_edges.py).
KL_MAX_EXPONENT = 1e12


def peak_bound(coeffs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A bound on max |f| / t of each row of ``coeffs`` (..., K), float64: |f(x)| <= ||c||
    sqrt(K / 4 pi) for every x (Cauchy-Schwarz and the addition theorem; an exact SHDD
    reaches it at its point)."""
    k = coeffs.shape[-1]
    return coeffs.detach().double().norm(dim=-1) * (math.sqrt(k / (4 * math.pi)) / temperature)


def kl_divergence(pred, target, *, grid=None, temperature: float = 1.0, reduction: str = "mean"):
    """SHDD-KL: ``KL(softmax(f_target/t) || softmax(f_pred/t))`` over the cells of a ring grid
    (with their areas), per vector, reduced by ``reduction`` ("mean", "sum", "none").

    The fused op ``locdiff::shdd_kl`` keeps no batch x grid matrix; when either input needs a
    gradient, ``locdiff::shdd_kl_grad`` computes the gradients in the same pass (backward
    only scales them), w.r.t. pred and target. Shapes ``(..., K)``, broadcast. The default
    grid is :func:`log_normalizer`'s for the sharper of the two: the softmaxes are sharper
    than f, and on the decode grid a sharp pair's KL can be off by half. Training passes the
    grid its sharpness needs (``locdiff.diffusion.losses.kl_grid``).

    >>> c = encode(torch.tensor([[10.0, 20.0]]), 16)
    >>> float(kl_divergence(c, c))
    0.0
    """
    p, degree, lead_p, numpy = _check_coeffs(pred, "pred")
    q, degree_t, lead_t, _ = _check_coeffs(target, "target")
    if degree_t != degree:
        raise ValueError(f"pred and target must have the same length, got {p.shape[-1]} and {q.shape[-1]}")
    t = check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    bp, bq = peak_bound(p, t), peak_bound(q, t)
    both = torch.cat([bp, bq.to(bp)])
    if both.numel() and float(both.max()) > KL_MAX_EXPONENT:  # one reduction, one device sync for both
        name, bound = ("pred", bp) if bp.numel() and float(bp.max()) > KL_MAX_EXPONENT else ("target", bq)
        b = int(bound.argmax())
        raise ValueError(f"{name} row {b}: |f| / temperature may reach {float(bound[b]):.3g}, past "
                         f"{KL_MAX_EXPONENT:g}, where the KL loses its digits in float64; expected vectors "
                         "of a smaller scale or a higher temperature")
    grid = _normalizer_grid(grid, degree, t, p, q)
    if not grid.is_ring:
        raise ValueError(f"kl_divergence needs a ring grid (equiangular or gauss_legendre), got {grid.kind}")
    if p.device != q.device:
        raise ValueError(f"pred is on {p.device} but target is on {q.device}; expected both on one device")
    shape = _broadcast(lead_p, lead_t, "pred", "target")
    dtype = torch.promote_types(p.dtype, q.dtype)
    K = p.shape[-1]
    p = p.to(dtype).reshape(*lead_p, K).expand(*shape, K).reshape(-1, K).contiguous()
    q = q.to(dtype).reshape(*lead_t, K).expand(*shape, K).reshape(-1, K).contiguous()
    kl = shdd_api.kl_divergence(p, q, _grid_args(grid, degree, p.device), 1.0 / t).reshape(shape)
    if reduction == "mean":
        kl = kl.mean()
    elif reduction == "sum":
        kl = kl.sum()
    return _out(kl, numpy)


__all__ = ["ascend", "decode", "default_separation_km", "degree_of", "density", "encode", "grid_values",
           "kl_divergence", "log_density_at", "log_normalizer", "project", "smoothing_factors", "top_k", "values_at"]
