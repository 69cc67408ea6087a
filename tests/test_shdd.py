"""SHDD: encode / decode to the metre, noisy decoding, top-k, densities, the SHDD-KL op, the
fused kernels against the pure-torch reference, opcheck, gradcheck and bad input."""
import math

import numpy as np
import pytest
import torch

import locdiff
from locdiff import geo, grids, shdd
from locdiff.ops import shdd as ops
from locdiff.ops import shdd_api, shdd_gemm
from locdiff.ops.shdd_torch import ring_local_maxima
from shdd_helpers import refine_torch, ring_args, torch_route_candidates
from locdiff.ops import shdd_reference as ref
from locdiff.ops.sh_reference import spherical_harmonics_reference
from locdiff.testing import assert_close

torch.manual_seed(0)


def random_latlon(n, gen=None):
    gen = gen or torch.Generator().manual_seed(n)
    z = torch.rand(n, dtype=torch.float64, generator=gen) * 2 - 1
    lat = torch.asin(z) * 180 / math.pi
    lon = torch.rand(n, dtype=torch.float64, generator=gen) * 360 - 180
    return torch.stack([lat, lon], -1)


SPECIAL = torch.tensor([[90.0, 0.0], [-90.0, 0.0], [90.0, 123.0], [0.0, 180.0], [0.0, -180.0],
                        [35.0, 179.99999], [-35.0, -179.99999], [89.9999, 45.0], [-89.99, -170.0]],
                       dtype=torch.float64)


@pytest.mark.parametrize("degree", [4, 5, 8, 16, 31, 64, 100, 128, 256, 512])
def test_encode_decode_exact_to_a_metre(degree):
    n = 24 if degree <= 128 else 6
    ll = torch.cat([random_latlon(n), SPECIAL])
    d = shdd.decode(shdd.encode(ll, degree))
    err_m = locdiff.great_circle_km(d, ll) * 1000
    assert float(err_m.max()) < 1.0, (degree, err_m.max())


def test_encode_decode_float32_and_numpy():
    ll = random_latlon(10).numpy()
    c = shdd.encode(ll.astype(np.float32), 64)
    assert isinstance(c, np.ndarray) and c.dtype == np.float32 and c.shape == (10, 65 ** 2)
    d = shdd.decode(c)
    assert isinstance(d, np.ndarray) and d.shape == (10, 2)
    # float32 coefficients round the point by ~1e-7 relative: far under 25 m.
    assert float(locdiff.great_circle_km(d, ll).max()) < 0.025
    # A single vector gives a single point; refine=False gives a grid point.
    one = shdd.decode(torch.from_numpy(c[0]).double(), refine=False)
    assert one.shape == (2,)
    assert float(locdiff.great_circle_km(one, torch.from_numpy(ll[0]))) < 217 * 1.5


def test_decode_on_other_grids():
    ll = torch.cat([random_latlon(6), SPECIAL[:4]])
    c = shdd.encode(ll, 32)
    for kind in grids.KINDS:
        d = shdd.decode(c, grid=grids.for_degree(32, kind))
        assert float(locdiff.great_circle_km(d, ll).max()) * 1000 < 1.0, kind


@pytest.mark.parametrize("degree", [16, 48])
@pytest.mark.parametrize("noise", [0.5, 2.0, 8.0])
def test_noisy_decode_beats_denser_grid(degree, noise):
    gen = torch.Generator().manual_seed(degree)
    c = shdd.encode(random_latlon(40, gen), degree)
    c = c + noise * torch.randn(c.shape, generator=gen, dtype=torch.float64) / math.sqrt(4 * math.pi)
    d = shdd.decode(c)
    fd = (c * locdiff.spherical_harmonics(locdiff.latlon_to_xyz(d), degree)).sum(-1)
    dense = grids.for_degree(degree, oversample=2.0)  # four times the points
    assert dense.size >= 4 * grids.for_degree(degree).size * 0.9
    fmax = shdd.grid_values(c, dense).max(-1).values
    assert bool((fd >= fmax - 1e-9 * fmax.abs()).all()), (fd - fmax).min()
    # ... and as high as the best grid point of a Fibonacci grid of the same density.
    fib = ref.shdd_synth_reference(c, grids.for_degree(degree, "fibonacci", 2.0).xyz, locdiff.spherical_harmonics)
    assert bool((fd >= fib.max(-1).values - 1e-9).all())


@pytest.mark.parametrize("degree", [24, 64])
def test_top_k_recovers_separated_deltas(degree):
    pts = torch.tensor([[48.85, 2.35], [-33.87, 151.21], [40.71, -74.0], [35.68, 139.69], [-1.29, 36.82],
                        [-90.0, 0.0], [64.1, -21.9]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45], dtype=torch.float64)
    c = (w[:, None] * shdd.encode(pts, degree)).sum(0)
    ll, vals = shdd.top_k(c, len(pts))
    assert ll.shape == (len(pts), 2) and vals.shape == (len(pts),)
    assert bool((vals[1:] <= vals[:-1]).all())
    # Each delta is found, within a tenth of its lobe (the others' side lobes shift it).
    dist = locdiff.great_circle_km(ll[:, None], pts[None])
    r_km = grids.half_max_radius(degree) * locdiff.EARTH_RADIUS_KM
    assert float(dist.min(0).values.max()) < 0.12 * r_km
    assert float(dist.min(1).values.max()) < 0.12 * r_km
    # Batched, and asking for more modes than exist at a large separation: NaN / -inf padding.
    ll2, v2 = shdd.top_k(torch.stack([c, c]), 3, min_separation_km=15000.0)
    assert ll2.shape == (2, 3, 2)
    assert torch.isnan(ll2[0, -1]).all() and v2[0, -1] == -math.inf


def test_density_and_log_density():
    c = shdd.encode(random_latlon(3), 16, smoothing=0.05)
    g = grids.for_degree(16)
    t = 4.0
    p = shdd.density(c, g, temperature=t)
    assert p.shape == (3, g.size)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=torch.float64))
    # log density per steradian at grid points = log(p_i / area_i).
    i = torch.tensor([5, 100, 700])
    lp = shdd.log_density_at(c, g.latlon[i], g, temperature=t)
    torch.testing.assert_close(lp, (p[torch.arange(3), i] / g.area[i]).log())
    # Same on a non-ring grid (dense route): both normalisations integrate the same density.
    fib = grids.for_degree(16, "fibonacci", 2.0)
    lp2 = shdd.log_density_at(c, g.latlon[i], fib, temperature=t)
    torch.testing.assert_close(lp2, lp, rtol=0, atol=2e-2)  # two Riemann sums
    # Differentiable w.r.t. the coefficients (gradient = Y(x)/t - E_p[Y]/t).
    cc = c.clone().requires_grad_(True)
    shdd.log_density_at(cc, g.latlon[i], g, temperature=t).sum().backward()
    y = locdiff.spherical_harmonics(g.xyz, 16)
    expect = (locdiff.spherical_harmonics(g.xyz[i], 16) - p @ y) / t
    torch.testing.assert_close(cc.grad, expect)


def test_encode_smoothing():
    ll = random_latlon(4)
    c = shdd.encode(ll, 8)
    s = 0.1
    l = torch.arange(9, dtype=torch.float64)
    w = torch.exp(-l * (l + 1) * s * s / 2).repeat_interleave(2 * torch.arange(9) + 1)
    torch.testing.assert_close(shdd.encode(ll, 8, smoothing=s), c * w)
    # A bandwidth's weights are cached per degree, bandwidth and dtype: a repeat, float32
    # and another bandwidth must each get their own.
    torch.testing.assert_close(shdd.encode(ll, 8, smoothing=s), c * w)
    torch.testing.assert_close(shdd.encode(ll.float(), 8, smoothing=s), (c * w).float())
    w2 = torch.exp(-l * (l + 1) * 0.04 / 2).repeat_interleave(2 * torch.arange(9) + 1)
    torch.testing.assert_close(shdd.encode(ll, 8, smoothing=0.2), c * w2)
    per = torch.linspace(1, 0, 9, dtype=torch.float64)
    torch.testing.assert_close(shdd.encode(ll, 8, smoothing=per),
                               c * per.repeat_interleave(2 * torch.arange(9) + 1))
    # A smoothed delta decodes to the same point.
    d = shdd.decode(shdd.encode(ll, 32, smoothing=0.05))
    assert float(locdiff.great_circle_km(d, ll).max()) * 1000 < 1.0


# ---- fused kernels vs the pure-torch reference ------------------------------------------------
GRID = grids.equiangular(9, 16)  # odd nlat: the equator ring has no mirror
GRID2 = grids.gauss_legendre(8, 12)  # nlon not a power of two: direct DFT
# More than 2^17 values: the log-partition and the KL take the per-vector kernels instead of
# the SIMD-lane ones.
BIG_GRID = grids.equiangular(130, 1024)


@pytest.mark.parametrize("grid", [GRID, GRID2, BIG_GRID], ids=["odd-nlat", "dft", "per-vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_synth_adjoint_logz_match_reference(grid, dtype):
    L = 6
    c = torch.randn(11, (L + 1) ** 2, dtype=dtype)
    a = ring_args(grid, L)
    assert_close(ops.shdd_synth_op(c, *a), ref.shdd_synth_reference(c, grid.xyz))
    w = torch.randn(11, grid.size, dtype=dtype)
    y = spherical_harmonics_reference(grid.xyz, L).to(dtype)
    assert_close(ops.shdd_adjoint_op(w, *a), (w.double() @ y.double()).to(dtype))  # float64 sums
    assert_close(ops.shdd_logz_op(c, *a, 2.0),
                 ref.shdd_logz_reference(c.double(), grid.xyz, grid.area, 0.5))



@pytest.mark.parametrize("batch", [1, 8, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_synth_lane_blocks_match_reference(batch, dtype):
    # Synthesis runs 8 vectors per SIMD lane block: a partial block, a full one, and three
    # blocks of which the last is partial (lanes past the batch hold stale vectors), at a
    # degree with an odd number of northern rings (two rings per Legendre pass).
    L = 20
    grid = grids.for_degree(L)
    assert (grid.nlat // 2) % 2 == 1
    c = torch.randn(batch, (L + 1) ** 2, dtype=dtype)
    f = ops.shdd_synth_op(c, *ring_args(grid, L))
    expect = ref.shdd_synth_reference(c.double(), grid.xyz)
    # float32 lanes compute in float32: within a few roundings of the largest value.
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert float((f.double() - expect).abs().max()) <= tol * float(expect.abs().max())
    idx, val, _ = ops.shdd_candidates_op(c, *ring_args(grid, L), 3)
    torch.testing.assert_close(idx[:, 0], f.argmax(-1))


@pytest.mark.parametrize("grid", [GRID, GRID2, BIG_GRID], ids=["odd-nlat", "dft", "per-vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_reference(dtype, grid):
    L = 5
    p = torch.randn(7, (L + 1) ** 2, dtype=dtype)
    t = torch.randn(7, (L + 1) ** 2, dtype=dtype)
    got = shdd.kl_divergence(p, t, grid=grid, temperature=0.7, reduction="none")
    assert_close(got, ref.shdd_kl_reference(p, t, grid.xyz, grid.area, 0.7))
    assert_close(shdd.kl_divergence(p, t, grid=grid, temperature=0.7), got.mean())
    assert_close(shdd.kl_divergence(p, t, grid=grid, temperature=0.7, reduction="sum"), got.sum())
    assert float(shdd.kl_divergence(t, t, grid=grid).abs()) < 1e-5
    # Backward against autograd through the reference; one gradient alone too (the training
    # case: targets need none).
    p1, t1 = p.double().requires_grad_(True), t.double().requires_grad_(True)
    p2, t2 = p.double().requires_grad_(True), t.double().requires_grad_(True)
    p3 = p.double().requires_grad_(True)
    g = torch.rand(7, dtype=torch.float64)
    (shdd.kl_divergence(p1, t1, grid=grid, temperature=0.7, reduction="none") * g).sum().backward()
    (ref.shdd_kl_reference(p2, t2, grid.xyz, grid.area, 0.7) * g).sum().backward()
    (shdd.kl_divergence(p3, t.double(), grid=grid, temperature=0.7, reduction="none") * g).sum().backward()
    assert_close(p1.grad, p2.grad)
    assert_close(t1.grad, t2.grad)
    assert_close(p3.grad, p2.grad)


def test_kl_gradcheck():
    L = 3
    p = torch.randn(3, (L + 1) ** 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, (L + 1) ** 2, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: shdd.kl_divergence(a, b, grid=GRID, temperature=0.8, reduction="none")
    assert torch.autograd.gradcheck(fn, (p, t))
    assert torch.autograd.gradcheck(lambda a: fn(a, t.detach()), (p,))
    # Twice over (a Hessian, a gradient penalty): the fused gradient is a constant, so a
    # second derivative must come from elsewhere, not silently be 0; the op's own backward
    # (reached through the op, not kl_divergence) too.
    assert torch.autograd.gradgradcheck(fn, (p, t))
    assert torch.autograd.gradgradcheck(lambda a: fn(a, t.detach()), (p,))
    assert float(torch.autograd.functional.hessian(lambda a: fn(a, t.detach()).sum(), p.detach()).abs().max()) > 1e-3
    assert torch.autograd.gradgradcheck(lambda a, b: ops.shdd_kl_op(a, b, *ring_args(GRID, L), 1 / 0.8), (p, t))
    # Synthesis and its adjoint are each other's backward.
    a = ring_args(GRID, L)
    assert torch.autograd.gradcheck(lambda c: ops.shdd_synth_op(c, *a), (p,))
    w = torch.randn(2, GRID.size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.shdd_adjoint_op(x, *a), (w,))


def test_eval_and_candidates_match_reference():
    L = 12
    c = torch.randn(5, (L + 1) ** 2, dtype=torch.float64)
    xyz = torch.cat([torch.randn(40, 3, dtype=torch.float64) * 3, torch.tensor([[0, 0, 2.0], [0, 0, -1.0]])])
    row = torch.randint(0, 5, (42,))
    v, g = ops.shdd_eval_op(c, xyz, row, L)
    vr, gr = ref.shdd_eval_reference(c, xyz, row)
    assert_close(v, vr)
    assert_close(g, gr)
    # float32 coefficients are read as they are (all arithmetic in float64)
    v32, _ = ops.shdd_eval_op(c.float(), xyz, row, L)
    assert_close(v32, ref.shdd_eval_reference(c.float().double(), xyz, row)[0])
    grid = grids.equiangular(14, 32)
    idx, val, start = ops.shdd_candidates_op(c, *ring_args(grid, L), 6)
    f = ref.shdd_synth_reference(c, grid.xyz)
    torch.testing.assert_close(val[:, 0], f.max(-1).values)
    torch.testing.assert_close(idx[:, 0], f.argmax(-1))
    assert bool((val[:, 1:] <= val[:, :-1]).all())
    torch.testing.assert_close(val, torch.gather(f, 1, idx.clamp_min(0)).where(idx >= 0, val))
    assert start.shape == (5, 6, 2)


@pytest.mark.parametrize("route", ["gemm", "fused"])
@pytest.mark.parametrize("grid", [GRID, GRID2], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_both_routes_match_reference(grid, dtype, route, monkeypatch):
    # L = 6 and 9 vectors would take the fused kernel; "gemm" lowers its bounds so that
    # GRID takes the GEMM + real-FFT route (odd nlat: the equator has no mirror). GRID2
    # (nlon = 2L) always takes the fused kernel.
    if route == "gemm":
        monkeypatch.setattr(shdd_gemm, "_FUSED_MAX_DEGREE", -1)
        monkeypatch.setattr(shdd_gemm, "_FUSED_WIDE_DEGREE", -1)
    L = 6
    c = torch.randn(9, (L + 1) ** 2, dtype=torch.float64)
    idx, val, _ = ops.shdd_candidates_op(c.to(dtype), *ring_args(grid, L), 5)
    f = ref.shdd_synth_reference(c.to(dtype).double(), grid.xyz)
    assert_close(val[:, 0].to(dtype), f.max(-1).values.to(dtype))
    torch.testing.assert_close(idx[:, 0], f.argmax(-1))
    ok = idx >= 0
    assert_close(val[ok].to(dtype), torch.gather(f, 1, idx.clamp_min(0))[ok].to(dtype))


@pytest.mark.parametrize("grid, degree", [(GRID, 6), (GRID2, 5), (grids.for_degree(20), 20)], ids=["odd-nlat", "dft", "L20"])
def test_torch_local_maxima_match_the_cpp_scan(grid, degree):
    # The devices without the C++ scan (CUDA) take ring_local_maxima + topk: the same maxima,
    # in the same order of value, and the same decode after refinement.
    c = torch.randn(9, (degree + 1) ** 2, dtype=torch.float64)
    _, val, _ = ops.shdd_candidates_op(c, *ring_args(grid, degree), 6)
    val_t, start_t = torch_route_candidates(c, degree, grid, 6)
    assert_close(val_t, val)
    # The same decode after refinement, on the grid decode uses for the degree. The two paths
    # start a grid maximum's refinement from different points (the grid point; the C++ scan's
    # sub-grid step), which now and then lie in two maxima's basins: measured 1 row in 8,100
    # on these grids (and more on grids too coarse for the degree, as GRID at L = 6), so one
    # row of the nine may differ, no more.
    grid = grids.for_degree(degree)
    val_t, start_t = torch_route_candidates(c, degree, grid, 6)
    value, start = shdd_api.candidates(c, shdd._grid_args(grid, degree, 'cpu'), 6)
    xyz, f = refine_torch(c, degree, val_t, start_t, 3)
    xyz_c, f_c = refine_torch(c, degree, value, start, 3)
    same = (f[:, 0] - f_c[:, 0]).abs() <= 1e-9 * (1 + f_c[:, 0].abs())
    assert int((~same).sum()) <= 1, (f[:, 0], f_c[:, 0])
    # (from other starting points: a broad low-degree maximum is flat to ~1e-8 rad)
    d_km = locdiff.great_circle_km(locdiff.xyz_to_latlon(xyz[same, 0]), locdiff.xyz_to_latlon(xyz_c[same, 0]))
    assert float(d_km.max()) < 1e-3
    # Polar fold: a maximum on the first ring next to higher values across the pole is not one.
    f_pole = torch.zeros(1, 4, 8)
    f_pole[0, 0, 0], f_pole[0, 0, 4] = 1.0, 2.0
    peak = ring_local_maxima(f_pole)
    assert not bool(peak[0, 0, 0]) and bool(peak[0, 0, 4])


@pytest.mark.parametrize("degree", [3, 12, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_matches_reference(degree, dtype):
    # Analytic Hessian on the sphere against double autograd through the torch reference, at
    # random points, the poles, the antimeridian and 1e-120 from the axis (the axis form).
    L = degree
    gen = torch.Generator().manual_seed(L)
    c = torch.randn(4, (L + 1) ** 2, dtype=torch.float64, generator=gen).to(dtype)
    special = torch.cat([locdiff.latlon_to_xyz(SPECIAL),
                         torch.tensor([[1e-120, -2e-120, 1.0], [3e-121, 1e-121, -1.0]], dtype=torch.float64)])
    xyz = torch.cat([torch.randn(20, 3, dtype=torch.float64, generator=gen) * 2, special])
    row = torch.arange(xyz.shape[0]) % 4
    h = ops.shdd_hessian_op(c, xyz, row, L)
    hr = ref.shdd_hessian_reference(c.double(), xyz, row)
    scale = float(c.double().abs().sum(-1).max()) * (L + 1) ** 2 / 10
    torch.testing.assert_close(h, hr, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(h, h.transpose(1, 2), rtol=0, atol=1e-13 * scale)
    u = xyz / xyz.norm(dim=-1, keepdim=True)
    assert float((h @ u[..., None]).abs().max()) <= 1e-13 * scale  # zero along the normal


def test_refine_matches_reference():
    L = 16
    gen = torch.Generator().manual_seed(3)
    c = shdd.encode(random_latlon(6, gen), L) + 0.5 * torch.randn(6, (L + 1) ** 2, generator=gen,
                                                                 dtype=torch.float64)
    start = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    row = torch.arange(12) % 6
    r = grids.half_max_radius(L)
    u, f = ops.shdd_refine_op(c, start, row, L, r, 40)
    ur, fr = ref.shdd_refine_reference(c, L, row, start.clone(), r)
    torch.testing.assert_close(f, fr, rtol=0, atol=1e-12)
    # Same local maxima (to well under a metre on Earth at L = 16).
    assert float((u - ur).norm(dim=-1).max()) < 1e-9
    assert_close(u.norm(dim=-1), torch.ones(12, dtype=torch.float64))


@pytest.mark.parametrize("noise", [0.0, 1.0, 6.0])
def test_decode_refine_kernel_matches_torch_form(noise):
    # The C++ choice-and-refinement loop (shdd_decode_refine) against its torch form, on the
    # same candidates: clean deltas refine one candidate, noisy vectors several rounds.
    L = 24
    gen = torch.Generator().manual_seed(7)
    c = shdd.encode(random_latlon(20, gen), L) + noise * torch.randn(20, (L + 1) ** 2, generator=gen,
                                                                     dtype=torch.float64)
    grid = grids.for_degree(L)
    _, value, start = ops.shdd_candidates_op(c.float(), *ring_args(grid, L), 16)
    th, ph = start[..., 0], start[..., 1]
    start_xyz = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1)
    xyz, f = ops.shdd_decode_refine_op(c, value, start, L, grids.half_max_radius(L), 3, 40)
    xyz_t, f_t = refine_torch(c, L, value, start_xyz, 3)
    # the one-op decode is the same two steps
    xyz_d, f_d = ops.shdd_decode_op(c, *ring_args(grid, L), 16, grids.half_max_radius(L), 3, 40)
    torch.testing.assert_close(f_d, f, rtol=0, atol=0)
    torch.testing.assert_close(xyz_d, xyz, rtol=0, atol=0)
    assert bool((xyz[~torch.isfinite(f)] == 0).all())  # candidates not refined: zero vectors
    refined = torch.isfinite(f_t)
    torch.testing.assert_close(torch.isfinite(f), refined)
    torch.testing.assert_close(f[refined], f_t[refined], rtol=0, atol=1e-12)
    assert float((xyz - xyz_t)[refined].norm(dim=-1).max()) < 1e-9
    assert bool((f[:, 1:] <= f[:, :-1]).all())


def test_opcheck():
    L = 4
    a = ring_args(GRID, L)
    c = torch.randn(3, (L + 1) ** 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, (L + 1) ** 2, dtype=torch.float64)
    w = torch.randn(3, GRID.size, dtype=torch.float64, requires_grad=True)
    xyz = torch.randn(6, 3, dtype=torch.float64)
    row = torch.randint(0, 3, (6,))
    checks = [
        (ops.shdd_synth_op, (c, *a)),
        (ops.shdd_adjoint_op, (w, *a)),
        (ops.shdd_candidates_op, (c.detach(), *a, 3)),
        (ops.shdd_logz_op, (c, *a, 1.5)),
        (ops.shdd_eval_op, (c.detach(), xyz, row, L)),
        (ops.shdd_hessian_op, (c.detach(), xyz, row, L)),
        (ops.shdd_refine_op, (c.detach(), xyz, row, L, 0.5, 10)),
        (ops.shdd_decode_refine_op, (c.detach(), *ops.shdd_candidates_op(c.detach(), *a, 4)[1:], L, 0.5, 2, 10)),
        (ops.shdd_decode_op, (c.detach(), *a, 4, 0.5, 2, 10)),
        (ops.shdd_kl_op, (c, t, *a, 1.5)),
        (ops.shdd_kl_backward_op, (c.detach(), t, torch.rand(3, dtype=torch.float64), *a, 1.5, True, False)),
        (ops.shdd_kl_grad_op, (c, t, *a, 1.5, True, False)),
        (ops.shdd_kl_grad_op, (c, t.clone().requires_grad_(True), *a, 1.5, True, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_empty_batch():
    c = torch.empty(0, 25, dtype=torch.float64)
    assert shdd.decode(c).shape == (0, 2)
    assert shdd.kl_divergence(c, c, reduction="none").shape == (0,)
    assert shdd.top_k(c, 2)[0].shape == (0, 2, 2)


# ---- bad input ------------------------------------------------------------------------------
GOOD = shdd.encode(torch.tensor([[1.0, 2.0]], dtype=torch.float64), 3)


@pytest.mark.parametrize("call, match", [
    (lambda: shdd.decode(torch.zeros(2, 15)), "square.*15"),
    (lambda: shdd.decode(torch.zeros(0)), "square.*0"),
    (lambda: shdd.decode(GOOD.clone().index_fill_(1, torch.tensor([3]), math.nan)), "finite.*nan.*index 3"),
    (lambda: shdd.decode(GOOD.clone().index_fill_(1, torch.tensor([0]), math.inf)), "finite.*inf"),
    (lambda: shdd.top_k(GOOD, 0), "k must.*0"),
    (lambda: shdd.top_k(GOOD, -2), "k must.*-2"),
    (lambda: shdd.top_k(GOOD, 2, min_separation_km=-1.0), "min_separation_km.*-1"),
    (lambda: shdd.density(GOOD, temperature=0), "temperature.*0"),
    (lambda: shdd.density(GOOD, temperature=-1.5), r"temperature.*-1\.5"),
    (lambda: shdd.kl_divergence(GOOD, GOOD, temperature=float("nan")), "temperature.*nan"),
    (lambda: shdd.log_density_at(GOOD, [0.0, 0.0], temperature=0.0), "temperature.*0"),
    (lambda: shdd.kl_divergence(GOOD, GOOD, reduction="max"), "reduction.*max"),
    (lambda: shdd.kl_divergence(GOOD, torch.zeros(1, 25)), "same length.*16.*25"),
    (lambda: shdd.kl_divergence(torch.zeros(1, 17), GOOD), "square.*17"),
    (lambda: shdd.kl_divergence(GOOD, GOOD, grid=grids.fibonacci(100)), "ring grid.*fibonacci"),
    (lambda: shdd.encode([[0.0, 0.0]], 3, smoothing=-0.1), "smoothing.*-0.1"),
    (lambda: shdd.encode([[0.0, 0.0]], 3, smoothing=torch.ones(3)), r"smoothing.*\(4,\)"),
    (lambda: shdd.encode([[95.0, 0.0]], 3), "latitudes.*95"),
    (lambda: shdd.decode(GOOD, candidates=0), "candidates.*0"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_at_with_and_without_a_gradient(dtype):
    # Without a gradient values_at takes the fused kernel (no (N, K) tables), with one the
    # harmonics table; both equal sum_k c_k Y_k(x) for broadcast batches, poles and the
    # antimeridian included, and the gradient w.r.t. the coefficients is Y(x).
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(3, 1, 289, generator=gen, dtype=torch.float64).to(dtype)
    ll = torch.cat([torch.rand(1, 4, 2, generator=gen, dtype=torch.float64) * torch.tensor([180.0, 360.0]) - torch.tensor([90.0, 180.0]),
                    torch.tensor([[[90.0, 0.0], [-90.0, 10.0], [5.0, 180.0], [5.0, -180.0]]], dtype=torch.float64)], 1)
    y = locdiff.spherical_harmonics(geo.latlon_to_xyz(ll), 16)              # (1, 8, 289)
    want = (c.double() * y).sum(-1)                                          # (3, 8)
    plain = shdd.values_at(c, ll)
    assert plain.shape == (3, 8) and plain.dtype == torch.float64
    torch.testing.assert_close(plain, want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-11)
    cg = c.clone().requires_grad_(True)
    tracked = shdd.values_at(cg, ll)
    torch.testing.assert_close(tracked.detach(), want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-11)
    tracked.sum().backward()
    torch.testing.assert_close(cg.grad.double(), y.sum(1, keepdim=True).expand(3, 1, 289), rtol=0, atol=1e-5)
    np.testing.assert_allclose(shdd.values_at(c.numpy(), ll.numpy()), want.numpy(), atol=1e-5)


def test_gpu_memory_counts_what_torch_holds_unused(monkeypatch):
    # cudaMemGetInfo counts torch's cached, unused blocks as taken: after freeing a 50 GB
    # output, the same call again was refused though torch would reuse its cache.
    from locdiff.ops import validation
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (28 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    dev = torch.device("cuda", 0)
    assert validation.free_gpu_bytes(dev) == 78 * gib
    validation.check_allocation((1500, 2049 ** 2), torch.float64, dev, "out")  # 47 GiB: fits the 78
    with pytest.raises(MemoryError, match=r"more than the 78.0 GiB available on cuda:0"):
        validation.check_allocation((2500, 2049 ** 2), torch.float64, dev, "out")


def test_cuda_scratch_out_of_memory_frees_torch_cache_then_says_so(monkeypatch):
    # The CUDA kernels' scratch comes from the driver, beside torch's cache: one retry after
    # torch.cuda.empty_cache(), then torch's own OutOfMemoryError (CUDA calls patched).
    import contextlib
    import types

    from locdiff.ops import launch
    calls, emptied = [], []

    def kernel(*args):
        calls.append(args)
        if len(calls) <= fails:
            raise RuntimeError(launch.SCRATCH_OOM)
        return "done"
    monkeypatch.setattr(launch._C, "fake_op_cuda", kernel, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    like = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    fails = 1
    assert launch.run("fake_op", like, 7) == "done" and len(calls) == 2 and emptied == [1]
    calls.clear()
    fails = 2
    with pytest.raises(torch.OutOfMemoryError, match="locdiff fake_op on cuda:0: no GPU memory for its scratch"):
        launch.run("fake_op", like, 7)


def test_decode_tables_that_cannot_fit_are_named(monkeypatch):
    # At high degree the decode's Legendre table and GEMM tables grow as L^3 (gigabytes past
    # L = 1000): a machine that cannot hold them gets a MemoryError naming them and the degree
    # before anything is allocated, not the allocator's raw error.
    from locdiff.ops import shdd_gemm, validation
    grid = grids.equiangular(301, 602)  # a fresh grid: no table cached yet
    c = shdd.encode(torch.tensor([10.0, 20.0]), 200)[None]
    monkeypatch.setattr(validation, "physical_memory_bytes", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"Legendre table of a 301-ring grid at degree 200 .*more than the 0.0 GiB"):
        shdd.decode(c, grid=grid)
    monkeypatch.undo()
    table = grid.legendre_table(200)
    # What the system can give now counts, not the machine's size: the table already held
    # is no longer available, so the GEMM copy must fit beside it.
    monkeypatch.setattr(validation, "physical_memory_bytes", lambda: table.numel() * 16)
    monkeypatch.setattr(validation, "available_memory_bytes", lambda: table.numel() * 8)
    with pytest.raises(MemoryError, match="the decode's GEMM tables at degree 200 .*decode at a lower degree"):
        shdd_gemm._gemm_layout(table, 200, 301, float(grid.lon0), 602, torch.float64)
    monkeypatch.undo()
    np.testing.assert_allclose(shdd.decode(c, grid=grid).numpy(), [[10.0, 20.0]], atol=1e-9)


@pytest.mark.parametrize("degree", [32, 64, 128])
def test_default_separation_is_the_kernels_first_zero(degree):
    from numpy.polynomial import legendre

    theta = np.linspace(1e-6, 0.5, 400_001)
    kernel = legendre.legval(np.cos(theta), 2 * np.arange(degree + 1) + 1.0)
    assert shdd.default_separation_km(degree) == pytest.approx(theta[np.argmax(kernel < 0)] * geo.EARTH_RADIUS_KM,
                                                               rel=0.02)


def test_a_density_too_large_for_memory_is_a_memory_error(monkeypatch):
    # 256 rows at L = 1024 need 12 GB for the values alone: the process was killed, silently.
    from locdiff.ops import validation

    monkeypatch.setattr(validation, "physical_memory_bytes", lambda: 2**24)
    monkeypatch.setattr(validation, "available_memory_bytes", lambda: 2**24)
    with pytest.raises(MemoryError, match="density of shape .* use fewer rows at a time"):
        shdd.density(shdd.encode(np.zeros((64, 2)), 16), grids.for_degree(16, oversample=4))
    with pytest.raises(ValueError, match="coeffs: coefficient length must be a square"):
        shdd.log_normalizer(np.zeros((2, 66050)), temperature=10.0)


def test_calls_from_several_threads_give_their_sequential_answers():
    # docs/conventions.md, "Threads": grids, tables and kernels are shared between calls.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    tasks = []
    for i, (degree, kind, t) in enumerate([(8, "equiangular", 0.5), (16, "gauss_legendre", 2.0),
                                           (24, "fibonacci", 5.0), (12, "equiangular", 1.0)] * 3):
        c = shdd.encode(rng.uniform([-90, -180], [90, 180], (6, 2)), degree) + 0.05 * rng.standard_normal(
            (6, (degree + 1) ** 2))
        tasks.append((c, grids.for_degree(degree, kind, oversample=1 + i / 7), t))

    def run(task):
        c, g, t = task
        return (shdd.decode(c), shdd.top_k(c, 2)[0], shdd.density(c, g, t),
                shdd.log_density_at(c, np.zeros((6, 2)), temperature=t), locdiff.spherical_harmonics(c[:, :3], 30))

    alone = [run(task) for task in tasks]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, tasks))
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_half_precision_weights_are_projected_in_float32_and_kernels_refuse_other_dtypes():
    # A float16 buffer read as float64 by the adjoint kernel wrote past its end.
    g = grids.for_degree(8, oversample=4)
    p = shdd.density(shdd.encode(np.array([20.0, 30.0]), 8), g, 1.0)
    want = shdd.project(p.astype(np.float32), 8, g)
    for half in (torch.from_numpy(p).half(), torch.from_numpy(p).bfloat16()):
        got = shdd.project(half, 8, g)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, atol=2e-2 * np.abs(want).max())
    assert shdd.project(p.astype(np.float16), 8, g).dtype == np.float32
    ring = shdd._grid_args(g, 8, "cpu").ring
    with pytest.raises(TypeError, match="float32 or float64 tensors, got torch.float16"):
        torch.ops.locdiff.shdd_adjoint(torch.from_numpy(p[None]).half(), *ring)
