"""Sphere grids for decoding SHDD vectors: Fibonacci lattices and ring grids (equiangular,
Gauss-Legendre).

Every grid carries unit vectors, (lat, lon) in degrees and cell areas in steradians that sum
to 4 pi. Ring grids (``grid.is_ring``) also carry their structure: ``nlat`` rings from north
to south, symmetric about the equator, each of ``nlon`` equally spaced points starting at
longitude ``lon0``; flat index ``j * nlon + k``. On them ``locdiff.shdd`` synthesises f by a
Legendre sum per ring and an FFT per ring pair (O(L^3)); other grids use a dense product.

>>> g = for_degree(64)
>>> (g.nlat, g.nlon), round(float(g.area.sum()), 12) == round(4 * math.pi, 12)
((94, 256), True)
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from locdiff.ops import shdd_api, validation

KINDS = ("equiangular", "gauss_legendre", "fibonacci")


def half_max_radius(degree: int) -> float:
    """Half-maximum radius (radians) of the degree-L SHDD kernel, about 0.034 * 64 / L
    (docs/conventions.md, "The SHDD kernel")."""
    return min(0.034 * 64 / max(int(degree), 1), math.pi / 2)


# Grid.nearest holds at most this many dot products (8 bytes each) at once.
NEAREST_CHUNK = 1 << 22


@dataclass(frozen=True, eq=False)
class Grid:
    """Points on the unit sphere with cell areas.

    ``xyz`` (G, 3), ``latlon`` (G, 2) degrees, ``area`` (G,) steradians summing to 4 pi, all
    float64 on the CPU. Ring grids add ``theta`` (nlat,) colatitudes in radians,
    ``ring_area`` (nlat,) the area of one cell of each ring, and ``lon0`` (radians).
    """

    kind: str
    xyz: torch.Tensor
    latlon: torch.Tensor
    area: torch.Tensor
    nlat: int = 0
    nlon: int = 0
    theta: torch.Tensor | None = None
    ring_area: torch.Tensor | None = None
    lon0: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_ring(self) -> bool:
        return self.theta is not None

    @property
    def size(self) -> int:
        return int(self.xyz.shape[0])

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        shape = f"nlat={self.nlat}, nlon={self.nlon}" if self.is_ring else f"n={self.size}"
        return f"Grid({self.kind}, {shape})"

    def nearest(self, xyz) -> torch.Tensor:
        """Index (int64, shape ``xyz.shape[:-1]``) of the grid point nearest each unit vector
        of ``xyz`` (..., 3) on the CPU: the largest dot product, the first of equals. Taken
        NEAREST_CHUNK dot products at a time, so a fine grid never needs a (points x cells)
        matrix."""
        x = torch.as_tensor(xyz).to(device="cpu", dtype=torch.float64)
        flat = x.reshape(-1, 3)
        out = torch.empty(len(flat), dtype=torch.int64)
        step = max(1, NEAREST_CHUNK // self.size)
        for i in range(0, len(flat), step):
            out[i:i + step] = (flat[i:i + step] @ self.xyz.T).argmax(1)
        return out.reshape(x.shape[:-1])

    def tensors(self, device, *names: str):
        """The named float64 tensors on ``device`` (cached per device)."""
        device = _device(device)
        out = []
        for name in names:
            key = (name, str(device))
            if key not in self._cache:
                validation.check_device(device)
                src = getattr(self, name) if name != "log_ring_area" else self.ring_area.log()
                self._cache[key] = src.to(device=device, dtype=torch.float64).contiguous()
            out.append(self._cache[key])
        return out

    def legendre_table(self, degree: int, device="cpu") -> torch.Tensor:
        """Orthonormal Legendre functions of the northern rings, m-major, sqrt(2) folded in for
        m > 0 (layout in csrc/include/locdiff/shdd_kernels.h). Cached per degree and device."""
        if not self.is_ring:
            raise ValueError(f"legendre_table needs a ring grid, got {self.kind}")
        key = ("legendre", int(degree), str(_device(device)))
        if key not in self._cache:
            validation.check_device(device)
            size = (self.nlat + 1) // 2 * ((int(degree) + 1) * (int(degree) + 2) // 2)
            validation.check_allocation((size,), torch.float64, torch.device("cpu"),
                                        f"the Legendre table of a {self.nlat}-ring grid at degree {degree}",
                                        "use a lower degree or a grid with fewer rings")
            self._cache[key] = _legendre_table(self.theta, self.nlat, int(degree)).to(device)
        return self._cache[key]

    def sh_table(self, degree: int, device="cpu", dtype=torch.float64) -> torch.Tensor:
        """Y (G, (L+1)^2) at every grid point, cached (the dense route; G x K memory)."""
        key = ("sh", int(degree), str(_device(device)), dtype)
        if key not in self._cache:
            validation.check_device(device)
            from locdiff.sh import spherical_harmonics

            self._cache[key] = spherical_harmonics(self.xyz.to(device), int(degree)).to(dtype)
        return self._cache[key]


def _device(device) -> torch.device:
    """A tensor's device as it is (the per-call path); anything else checked."""
    return device if isinstance(device, torch.device) else validation.check_device(device)


def _legendre_table(theta: torch.Tensor, nlat: int, degree: int) -> torch.Tensor:
    # The recurrence of the SH kernel per northern ring (scaled arithmetic where the seeds
    # underflow near the poles at high degree); tests compare it with spherical_harmonics.
    return shdd_api.legendre_table(theta, (nlat + 1) // 2, degree)


def next_pow2(n: float) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _from_xyz(kind, xyz, area, latlon=None, **rings) -> Grid:
    from locdiff.geo import xyz_to_latlon

    latlon = xyz_to_latlon(xyz) if latlon is None else latlon
    return Grid(kind=kind, xyz=xyz.contiguous(), latlon=latlon.contiguous(), area=area.contiguous(), **rings)


def _ring_grid(kind, theta: torch.Tensor, ring_area: torch.Tensor, nlon: int) -> Grid:
    nlat = int(theta.shape[0])
    lon0 = -math.pi
    lon = lon0 + 2 * math.pi * torch.arange(nlon, dtype=torch.float64) / nlon
    t, p = torch.meshgrid(theta, lon, indexing="ij")
    xyz = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1).reshape(-1, 3)
    area = ring_area[:, None].expand(nlat, nlon).reshape(-1)
    # The rings' own angles: longitudes rise from -180 along each ring (maps rely on it).
    latlon = torch.stack([90 - t * (180 / math.pi), p * (180 / math.pi)], -1).reshape(-1, 2)
    return _from_xyz(kind, xyz, area, latlon, nlat=nlat, nlon=nlon, theta=theta.contiguous(),
                     ring_area=ring_area.contiguous(), lon0=lon0)


def _check_size(n, name: str, minimum: int) -> int:
    return validation.check_int(n, name, minimum)


def equiangular(nlat: int, nlon: int | None = None) -> Grid:
    """Rings at colatitudes (j + 1/2) pi / nlat (no point on a pole), ``nlon`` points each from
    longitude -180; exact cell areas. ``nlon`` defaults to a power of two >= 2 nlat (FFT size).

    >>> equiangular(4, 8).latlon[0].tolist()
    [67.5, -180.0]
    """
    nlat = _check_size(nlat, "nlat", 2)
    nlon = next_pow2(2 * nlat) if nlon is None else _check_size(nlon, "nlon", 3)
    edges = torch.arange(nlat + 1, dtype=torch.float64) * (math.pi / nlat)
    theta = (edges[:-1] + edges[1:]) / 2
    ring_area = (edges[:-1].cos() - edges[1:].cos()) * (2 * math.pi / nlon)
    return _ring_grid("equiangular", theta, ring_area, nlon)


def gauss_legendre(nlat: int, nlon: int | None = None) -> Grid:
    """Rings at the Gauss-Legendre nodes in cos(colatitude); cell area = weight * 2 pi / nlon
    (exact quadrature of band-limited products up to degree 2 nlat - 1 in latitude)."""
    nlat = _check_size(nlat, "nlat", 2)
    nlon = next_pow2(2 * nlat) if nlon is None else _check_size(nlon, "nlon", 3)
    x, w = np.polynomial.legendre.leggauss(nlat)
    z = torch.from_numpy(x[::-1].copy())  # north to south
    theta = torch.arccos(z.clamp(-1, 1))
    ring_area = torch.from_numpy(w[::-1].copy()) * (2 * math.pi / nlon)
    return _ring_grid("gauss_legendre", theta, ring_area, nlon)


def fibonacci(n: int) -> Grid:
    """``n`` points of the Fibonacci (golden-angle) lattice, equal areas 4 pi / n.

    >>> fibonacci(1000).size
    1000
    """
    n = _check_size(n, "n", 2)
    i = torch.arange(n, dtype=torch.float64)
    z = 1 - (2 * i + 1) / n
    golden = math.pi * (3 - math.sqrt(5))
    phi = torch.remainder(i * golden, 2 * math.pi)
    s = torch.sqrt((1 - z * z).clamp_min(0))
    xyz = torch.stack([s * phi.cos(), s * phi.sin(), z], -1)
    area = torch.full((n,), 4 * math.pi / n, dtype=torch.float64)
    return _from_xyz("fibonacci", xyz, area)


# The grids most recently asked of for_degree, least recent first. Bounded: callers derive
# the oversample from a temperature, and a service taking temperatures from requests would
# otherwise keep a grid (and its tables) for every value it ever saw.
_FOR_DEGREE_CACHE: collections.OrderedDict = collections.OrderedDict()
FOR_DEGREE_CACHE_SIZE = 16
_FOR_DEGREE_LOCK = threading.Lock()


def for_degree(degree: int, kind: str = "equiangular", oversample: float = 1.0) -> Grid:
    """A grid fine enough for the degree-L SHDD kernel: spacing at most the kernel's
    half-maximum radius / ``oversample``, so every lobe has a grid point above half its peak
    (the largest side lobe is 13% of the peak). The last FOR_DEGREE_CACHE_SIZE grids asked
    for are cached (tables attach to them).

    >>> for_degree(32, "fibonacci").size > 2000
    True
    """
    degree = validation.check_degree(degree)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(oversample, (int, float)) and math.isfinite(oversample) and oversample > 0):
        raise ValueError(f"oversample must be a positive number, got {oversample!r}")
    key = (degree, kind, float(oversample))
    with _FOR_DEGREE_LOCK:
        grid = _FOR_DEGREE_CACHE.get(key)
        if grid is not None:
            _FOR_DEGREE_CACHE.move_to_end(key)
            return grid
    h = half_max_radius(degree) / oversample
    if kind == "fibonacci":
        grid = fibonacci(max(12, math.ceil(4 * math.pi / (h * h))))
    else:
        grid = (equiangular if kind == "equiangular" else gauss_legendre)(*ring_shape(degree, oversample))
    with _FOR_DEGREE_LOCK:
        # A thread that built the same grid meanwhile wins: one object per key.
        grid = _FOR_DEGREE_CACHE.setdefault(key, grid)
        _FOR_DEGREE_CACHE.move_to_end(key)
        while len(_FOR_DEGREE_CACHE) > FOR_DEGREE_CACHE_SIZE:
            _FOR_DEGREE_CACHE.popitem(last=False)
    return grid


def ring_shape(degree: int, oversample: float = 1.0) -> tuple[int, int]:
    """``(nlat, nlon)`` of the ring grid :func:`for_degree` builds, without building it."""
    h = half_max_radius(degree) / oversample
    nlat = max(4, math.ceil(math.pi / h))
    return nlat + nlat % 2, max(8, next_pow2(2 * math.pi / h))


__all__ = ["Grid", "KINDS", "equiangular", "fibonacci", "for_degree", "gauss_legendre", "half_max_radius"]
