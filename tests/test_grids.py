"""Sphere grids: areas, coordinates, ring structure, resolution rule, bad input."""
import math

import numpy as np
import pytest
import torch

import locdiff
from locdiff import grids


@pytest.mark.parametrize("grid", [grids.equiangular(7, 12), grids.equiangular(16), grids.gauss_legendre(9),
                                  grids.gauss_legendre(12, 30), grids.fibonacci(501)], ids=repr)
def test_points_and_areas(grid):
    assert grid.xyz.dtype == torch.float64 and grid.xyz.shape == (grid.size, 3)
    torch.testing.assert_close(grid.xyz.norm(dim=-1), torch.ones(grid.size, dtype=torch.float64))
    torch.testing.assert_close(locdiff.latlon_to_xyz(grid.latlon), grid.xyz, rtol=0, atol=1e-12)
    assert (grid.area > 0).all()
    assert abs(float(grid.area.sum()) - 4 * math.pi) < 1e-11
    assert len(grid) == grid.size


@pytest.mark.parametrize("make", [grids.equiangular, grids.gauss_legendre])
def test_ring_structure(make):
    g = make(10, 16)
    assert g.is_ring and (g.nlat, g.nlon) == (10, 16)
    torch.testing.assert_close(g.theta + g.theta.flip(0), torch.full((10,), math.pi, dtype=torch.float64))
    assert bool((g.theta[1:] > g.theta[:-1]).all())  # north to south
    lat = g.latlon.view(10, 16, 2)
    torch.testing.assert_close(lat[:, 0, 1], torch.full((10,), -180.0, dtype=torch.float64))
    torch.testing.assert_close(lat[:, :, 0], (90 - g.theta * 180 / math.pi)[:, None].expand(10, 16))
    torch.testing.assert_close(g.area.view(10, 16), g.ring_area[:, None].expand(10, 16))


def test_gauss_legendre_quadrature_is_exact():
    # Integral of Y_k Y_k' over the sphere = delta for degrees up to nlat - 1 (nlon > 2L).
    g = grids.gauss_legendre(9, 20)
    y = locdiff.spherical_harmonics(g.xyz, 8)
    gram = (y * g.area[:, None]).T @ y
    torch.testing.assert_close(gram, torch.eye(81, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("degree", [4, 16, 64, 128])
@pytest.mark.parametrize("kind", grids.KINDS)
def test_for_degree_covers_every_lobe(degree, kind):
    g = grids.for_degree(degree, kind)
    assert g is grids.for_degree(degree, kind)  # cached
    r = grids.half_max_radius(degree)
    pts = locdiff.latlon_to_xyz(torch.stack([torch.rand(1000, dtype=torch.float64) * 180 - 90,
                                             torch.rand(1000, dtype=torch.float64) * 360 - 180], -1))
    # Every point of the sphere lies within the half-maximum radius of a grid point.
    nearest = torch.acos((pts @ g.xyz.T).amax(-1).clamp(-1, 1))
    assert float(nearest.max()) <= r
    if g.is_ring and g.nlon > 2:
        assert g.nlon & (g.nlon - 1) == 0  # FFT size


def test_half_max_radius_matches_kernel():
    # f(x) = sum_l (2l+1)/(4 pi) P_l(cos d) falls to half its peak at about 0.034 * 64 / L.
    from scipy.special import eval_legendre

    for degree in (32, 64, 128):
        d = np.linspace(0, 0.1 * 64 / degree, 4001)
        l = np.arange(degree + 1)[:, None]
        f = ((2 * l + 1) * eval_legendre(l, np.cos(d)[None])).sum(0)
        half = d[np.argmax(f < f[0] / 2)]
        assert abs(half - grids.half_max_radius(degree)) < 0.05 * half


def test_legendre_table_layout():
    g = grids.equiangular(6, 8)
    L = 3
    t = g.legendre_table(L)
    nhalf = 3
    assert t.shape == (nhalf * sum(L + 1 - m for m in range(L + 1)),)
    y = locdiff.spherical_harmonics(torch.stack([g.theta.sin(), 0 * g.theta, g.theta.cos()], -1), L)
    off = 0
    for m in range(L + 1):
        n = L + 1 - m
        block = t[off:off + nhalf * n].view(nhalf, n)
        for i, l in enumerate(range(m, L + 1)):
            torch.testing.assert_close(block[:, i], y[:nhalf, l * l + l + m])
        off += nhalf * n


@pytest.mark.parametrize("call, match", [
    (lambda: grids.equiangular(1, 8), "nlat"),
    (lambda: grids.equiangular(4, 2), "nlon"),
    (lambda: grids.gauss_legendre(2.5), "nlat"),
    (lambda: grids.fibonacci(0), "n must"),
    (lambda: grids.for_degree(16, "healpix"), "kind"),
    (lambda: grids.for_degree(16, oversample=0), "oversample"),
    (lambda: grids.for_degree(-1), "degree"),
    (lambda: grids.fibonacci(10).legendre_table(3), "ring grid"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_for_degree_keeps_a_bounded_cache_of_the_latest_grids():
    # Callers derive the oversample from a temperature: a service taking temperatures from
    # requests must not keep a grid for every value it ever saw.
    from locdiff.grids import _FOR_DEGREE_CACHE, FOR_DEGREE_CACHE_SIZE

    first = grids.for_degree(8, oversample=1.0)
    for i in range(3 * FOR_DEGREE_CACHE_SIZE):
        grids.for_degree(8, oversample=1.5 + i / 1000)
        assert grids.for_degree(8, oversample=1.0) is first  # in use: kept, the same object
    assert len(_FOR_DEGREE_CACHE) == FOR_DEGREE_CACHE_SIZE
    old = grids.for_degree(8, oversample=1.5)  # evicted: built again, the same grid
    assert (old.nlat, old.nlon) == grids.ring_shape(8, 1.5)


@pytest.mark.parametrize("kind", ["equiangular", "gauss_legendre", "fibonacci"])
def test_nearest_is_the_largest_dot_product_in_any_chunking(kind, monkeypatch):
    g = grids.for_degree(16, kind)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 5, 3))
    x[0, :3] = [[0, 0, 1], [0, 0, -1], [-1, 1e-12, 0]]  # poles, the antimeridian
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    want = np.argmax(x @ g.xyz.numpy().T, -1)
    np.testing.assert_array_equal(g.nearest(x).numpy(), want)
    monkeypatch.setattr(grids, "NEAREST_CHUNK", 3 * g.size)  # three points a chunk
    got = g.nearest(torch.from_numpy(x).float())
    assert got.shape == (7, 5) and got.dtype == torch.int64
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got.numpy(), np.argmax(x32 @ g.xyz.numpy().T, -1))
    assert g.nearest(np.empty((0, 3))).shape == (0,)
