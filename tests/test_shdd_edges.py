"""The library's edges: coefficient scales the float32 grid stage cannot hold, empty
batches, top_k past the real modes, KL argument checks, and calls from forked children."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import locdiff
from locdiff import grids, shdd

PARIS = np.array([48.8566, 2.3522])


@pytest.mark.parametrize("scale", [1e38, 1e39, 1e300, 1e-300, -0.0 + 1e-40])
@pytest.mark.parametrize("refine", [True, False])
def test_decode_and_top_k_do_not_depend_on_a_positive_scale(scale, refine):
    # The grid stage runs in float32: rows are scaled by a power of two before it, exactly.
    c = shdd.encode(PARIS, 8)
    got = shdd.decode(c * scale, refine=refine)
    assert float(locdiff.great_circle_km(got, PARIS)) < (1e-3 if refine else 400.0)
    tol = 1e-9 if refine else 1e-5  # unrefined: a sub-cell step from float32 grid values
    np.testing.assert_allclose(got, shdd.decode(c, refine=refine), rtol=0, atol=tol)
    ll, v = shdd.top_k(c * scale, 2, refine=refine)
    ll1, v1 = shdd.top_k(c, 2, refine=refine)
    np.testing.assert_allclose(ll, ll1, rtol=0, atol=tol)
    ok = np.isfinite(v1)
    np.testing.assert_allclose(v[ok], v1[ok] * scale, rtol=1e-12 if refine else 1e-6)  # unrefined: float32


@pytest.mark.parametrize("scale", [1e-309, 1e-315])
def test_subnormal_coefficients_keep_their_mode(scale):
    # Scaling such a row to unit size takes a factor past float64's largest (2^1026 and
    # more): it is applied in two halves, so the row's remaining bits still find the mode.
    c = shdd.encode(PARIS, 16)
    for refine in (True, False):
        assert float(locdiff.great_circle_km(shdd.decode(c * scale, refine=refine), PARIS)) < (1e-3 if refine else 400)
    ll, v = shdd.top_k(c * scale, 2)
    assert float(locdiff.great_circle_km(ll[0], PARIS)) < 1e-3
    np.testing.assert_allclose(v[0] / scale, shdd.top_k(c, 1)[1][0], rtol=1e-6)


@pytest.mark.parametrize("degree", [8, 16, 32])
def test_a_large_constant_term_does_not_hide_the_mode(degree):
    # A constant moves no mode, but c_00 = 1 beside an SHDD scaled by 1e-9 would drown its
    # variation in the float32 grid stage; top_k's values still include the constant.
    p = np.array([37.0, -120.0])
    c = shdd.encode(p, degree) * 1e-9
    c[0] = 1.0
    for coeffs in (c, c.astype(np.float32)):
        assert float(locdiff.great_circle_km(shdd.decode(coeffs), p)) < 1.0
    ll, v = shdd.top_k(c, 1)
    assert float(locdiff.great_circle_km(ll[0], p)) < 1e-3
    np.testing.assert_allclose(v[0], shdd.values_at(c, p), rtol=1e-14)


def test_a_mode_whose_value_overflows_keeps_its_place():
    c = shdd.encode(PARIS, 16) * 1e307  # f's peak, 1e307 x (L+1)^2 / sqrt(4 pi), is past float64
    ll, v = shdd.top_k(c, 2)
    assert v[0] == np.inf and float(locdiff.great_circle_km(ll[0], PARIS)) < 1e-3
    np.testing.assert_allclose(shdd.decode(c), PARIS, atol=1e-9)


def test_values_at_differentiates_with_respect_to_the_points():
    c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 8)
    for fn in (shdd.values_at, shdd.log_density_at):
        ll = torch.tensor([[11.0, 21.0]], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: fn(c, x), (ll,))


def test_wrong_kinds_of_input_are_type_errors():
    c = shdd.encode(PARIS, 8)
    for bad in (torch.ones(1, 81, dtype=torch.bool), torch.ones(1, 81, dtype=torch.complex64)):
        for fn in (shdd.decode, shdd.density, shdd.log_normalizer):
            with pytest.raises(TypeError, match=r"coeffs must be a real numeric array or tensor, got dtype torch\."):
                fn(bad)
    with pytest.raises(TypeError, match="latlon must be a real numeric array or tensor, got dtype float128"):
        shdd.encode(PARIS.astype(np.longdouble), 8)
    np.testing.assert_array_equal(shdd.encode(PARIS.astype(">f8"), 8), c)  # the other byte order converts
    with pytest.raises(TypeError, match="temperature must be a real number, got '2'"):
        shdd.density(c, temperature="2")
    with pytest.raises(TypeError, match="min_separation_km must be a real number or None, got '5'"):
        shdd.top_k(c, 2, min_separation_km="5")
    np.testing.assert_array_equal(shdd.decode(c, candidates=np.int64(3)), shdd.decode(c, candidates=3))
    with pytest.raises(MemoryError, match=r"top_k's candidates for k = 1000000000 .*ask for fewer modes"):
        shdd.top_k(c, 10**9)


def test_decode_scales_each_row_alone():
    c = shdd.encode(np.array([PARIS, [-33.9, 151.2]]), 16)
    c[0] *= 1e200
    got = shdd.decode(c)
    assert float(locdiff.great_circle_km(got, np.array([PARIS, [-33.9, 151.2]])).max()) < 1e-3


def test_empty_batches_everywhere():
    K = 81
    empty = np.zeros((0, K))
    assert shdd.decode(empty).shape == (0, 2)
    ll, v = shdd.top_k(empty, 3)
    assert ll.shape == (0, 3, 2) and v.shape == (0, 3)
    assert shdd.grid_values(empty).shape == (0, grids.for_degree(8).size)
    assert shdd.density(empty).shape == (0, grids.for_degree(8).size)
    assert shdd.log_density_at(empty, np.zeros((0, 2))).shape == (0,)
    assert shdd.log_density_at(torch.zeros(2, 0, K), torch.zeros(2, 0, 2)).shape == (2, 0)
    assert shdd.kl_divergence(empty, empty, reduction="none").shape == (0,)
    assert shdd.encode(np.zeros((0, 2)), 8).shape == (0, K)
    assert locdiff.spherical_harmonics(np.zeros((0, 3)), 8).shape == (0, K)


@pytest.mark.parametrize("row", [np.zeros(81), np.eye(81)[0], np.ones(1)])
def test_a_constant_function_has_no_mode(row):
    # Every point is the maximum of a constant f: an answer would be the grid's first node.
    c = np.stack([shdd.encode(PARIS, 8), row]) if row.size == 81 else row[None]
    with pytest.raises(ValueError, match=f"coeffs row {1 if row.size == 81 else 0} describes a constant function"):
        shdd.decode(c)
    with pytest.raises(ValueError, match="constant function"):
        shdd.top_k(c, 2)
    tiny = np.zeros(81)
    tiny[2] = 1e-300  # Y_10, peaked at the north pole: any degree >= 1 content has modes
    assert shdd.decode(tiny)[0] == pytest.approx(90.0) and shdd.top_k(tiny, 1)[0][0, 0] == pytest.approx(90.0)


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_device_arguments_are_named_errors(device):
    # A device this torch cannot use fails with the argument's name, not deep inside torch.
    from locdiff.predict import Predictor

    calls = [lambda: shdd.smoothing_factors(8, 0.1, device=device),
             lambda: grids.for_degree(8).tensors(device, "xyz"),
             lambda: grids.for_degree(8).legendre_table(8, device),
             lambda: Predictor(torch.nn.Linear(1, 1), None, device=device),
             lambda: locdiff.run.load_model("no-such-run", device=device)]
    for call in calls:
        with pytest.raises(ValueError, match=f"device.*{device}"):
            call()


def test_top_k_stops_at_the_real_modes():
    # k far beyond the function's local maxima: the modes first, then NaN / -inf only, fast.
    g = torch.Generator().manual_seed(3)
    c = shdd.encode(torch.tensor([[10.0, 20.0], [-40.0, -60.0]], dtype=torch.float64), 8).sum(0)
    c = c + 0.05 * torch.randn(c.shape, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    ll, v = shdd.top_k(c, 5000)
    assert time.perf_counter() - t0 < 2.0
    assert ll.shape == (5000, 2) and v.shape == (5000,)
    n = int(torch.isfinite(v).sum())
    assert 2 <= n < 100
    assert bool(torch.isfinite(v[:n]).all()) and bool(torch.isneginf(v[n:]).all())
    assert bool(torch.isfinite(ll[:n]).all()) and bool(torch.isnan(ll[n:]).all())
    assert bool((v[:n].diff() <= 0).all())
    # the same modes as a k that asks for exactly those
    ll_n, v_n = shdd.top_k(c, n)
    torch.testing.assert_close(v_n, v[:n], rtol=0, atol=1e-12)


def test_kl_divergence_argument_checks():
    c = shdd.encode(torch.tensor([[10.0, 20.0], [0.0, 0.0], [5.0, 5.0]], dtype=torch.float64), 8)
    with pytest.raises(ValueError, match=r"pred batch shape \(3,\) and target batch shape \(2,\) do not broadcast"):
        shdd.kl_divergence(c, c[:2])
    with pytest.raises(ValueError, match=r"coeffs batch shape \(3,\) and latlon batch shape \(2,\)"):
        shdd.log_density_at(c, torch.zeros(2, 2))
    for t in (1e-300, 1e-30, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-06"):
            shdd.kl_divergence(c, c, temperature=t)
    kl = shdd.kl_divergence(c + 0.1, c, temperature=1e-6, reduction="none")
    assert bool(torch.isfinite(kl).all())


def test_inputs_on_two_devices_are_named_errors():
    # (meta stands in for a second device here; tests/test_shdd_cuda.py does it on a GPU)
    from locdiff.ops import launch

    with pytest.raises(ValueError, match="locdiff::shdd_kl: target is on meta but pred is on cpu"):
        launch.one_device("shdd_kl", pred=torch.zeros(1), target=torch.zeros(1, device="meta"))
    launch.one_device("shdd_kl", pred=torch.zeros(1), target=torch.zeros(1))


FORKED = textwrap.dedent("""
    import multiprocessing as mp, sys
    import torch, locdiff
    from locdiff import shdd
    torch.set_num_threads(2)
    x = torch.randn(100000, 3, dtype=torch.float64)
    locdiff.spherical_harmonics(x, 16)  # a multi-threaded parallel region in the parent
    shdd.decode(shdd.encode(torch.randn(64, 2).clamp(-80, 80).double(), 48))

    def child(_):
        c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 48)
        return (torch.get_num_threads(), float(locdiff.spherical_harmonics(x[:20000], 16).sum()),
                shdd.decode(c).tolist())

    with mp.get_context("fork").Pool(1) as pool:
        ((threads, total, decoded),) = pool.map_async(child, [0]).get(timeout=60)
    print(threads, decoded)
    assert threads == 1 and abs(decoded[0][0] - 10.0) < 1e-6
""")


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="needs fork")
def test_forked_children_can_call_the_library():
    # OpenMP's pool does not survive fork: a child that enters a parallel region after the
    # parent ran one would wait forever. The child gets one thread (docs/kernels.md).
    proc = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_longitudes_stay_in_their_documented_range():
    # (-180, 180], 0 on the poles: a -0.0 y, a y one rounding west of the antimeridian and
    # a decoded pole all gave -180 or an arbitrary longitude.
    from locdiff.geo import xyz_to_latlon

    for xyz, want in (([-1.0, -0.0, 0.0], [0.0, 180.0]), ([-0.0, -0.0, -1.0], [-90.0, 0.0]),
                      ([1e-17, 1e-17, 1.0], [90.0, 0.0]), ([-1.0, -1e-300, 0.0], [0.0, 180.0])):
        for arr in (np.array(xyz), torch.tensor(xyz, dtype=torch.float64)):
            assert np.asarray(xyz_to_latlon(arr)).tolist() == want, xyz
    assert shdd.decode(shdd.encode(np.array([10.0, -180.0]), 16)).tolist() == pytest.approx([10.0, 180.0])
    # The zero vector points nowhere: a missing answer, not the point (0, 0).
    for arr in (np.zeros((2, 3)), torch.zeros(2, 3, dtype=torch.float64), torch.tensor([[0.0, 0.0, -0.0]])):
        assert np.isnan(np.asarray(xyz_to_latlon(arr))).all(), arr


def test_searches_return_plain_results_and_take_numpy_scalars_as_scalars():
    c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 8).requires_grad_()
    assert not shdd.decode(c).requires_grad  # a search has no gradient: no graph that fails backward
    assert not any(t.requires_grad for t in shdd.top_k(c, 2))
    assert not any(t.requires_grad for t in shdd.ascend(c, torch.tensor([[11.0, 21.0]], dtype=torch.float64)))
    assert shdd.ascend(np.zeros((0, 81)), np.zeros((0, 2)))[1].dtype == np.float64
    with pytest.raises(ValueError, match="got a scalar"):
        shdd.decode(np.float64(1.0))
    np.testing.assert_allclose(shdd.encode(PARIS, 4, smoothing=np.float32(0.1)),
                               shdd.encode(PARIS, 4, smoothing=float(np.float32(0.1))))


def test_meta_tensors_are_named_not_implemented():
    for call in (lambda: shdd.decode(torch.zeros(2, 9, device="meta")),
                 lambda: shdd.encode(torch.zeros(2, 2, device="meta"), 4),
                 lambda: shdd.kl_divergence(torch.zeros(2, 9, device="meta"), torch.zeros(2, 9, device="meta"))):
        with pytest.raises(NotImplementedError, match="is on meta: locdiff runs on cpu and cuda devices"):
            call()


def test_kl_default_grid_resolves_sharp_densities():
    # The decode grid got a sharp pair's KL wrong by a factor 2.6 (0.57 against 1.50).
    g = torch.Generator().manual_seed(0)
    c = shdd.encode(torch.tensor([[30.0, 40.0], [-10.0, 100.0]], dtype=torch.float64), 8)
    p = c + 0.3 * torch.randn(c.shape, generator=g, dtype=torch.float64)
    fine = float(shdd.kl_divergence(p, c, temperature=0.3, grid=grids.for_degree(8, oversample=16)))
    assert float(shdd.kl_divergence(p, c, temperature=0.3)) == pytest.approx(fine, rel=0.01)


@pytest.mark.parametrize("degree", [4, 8, 16, 32])
def test_top_k_is_consistent_across_k(degree):
    # The first k modes of a top-k are the k highest: a larger k must not find a higher one.
    for lat in np.linspace(-85, 85, 35):
        c = shdd.encode(np.array([lat, 40.0]), degree)
        wide = shdd.top_k(c, 8)[1]
        for k in (1, 2, 3, 5):
            np.testing.assert_allclose(shdd.top_k(c, k)[1], wide[:k], rtol=1e-9, err_msg=f"lat {lat}, k {k}")


@pytest.mark.parametrize("degree", [32, 256, 512])
@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_a_lobe_on_a_pole_leaves_room_for_the_other_modes(degree, pole):
    # A lobe exactly on a pole makes the polar ring a plateau; its float32 rounding noise made
    # hundreds of tied local maxima, which filled top_k's pool from L = 256 and hid the second
    # mode. A polar ring now gives one candidate, in the C++ scan and in the torch route.
    from locdiff.ops import shdd as ops
    from shdd_helpers import ring_args, torch_route_candidates

    other = np.array([10.0 * np.sign(pole), 20.0])
    c = shdd.encode(np.array([pole, 0.0]), degree) + 0.5 * shdd.encode(other, degree)
    ll, v = shdd.top_k(c, 2)
    # (each lobe's side lobes move the other's peak: 2.2 km at L = 32)
    assert float(locdiff.great_circle_km(ll[0], [pole, 0.0])) < 5.0
    assert float(locdiff.great_circle_km(ll[1], other)) < 5.0
    np.testing.assert_allclose(v[1] / v[0], 0.5, atol=0.01)
    grid = grids.for_degree(degree)
    c32 = torch.as_tensor(c, dtype=torch.float32)[None]
    index, value, _ = ops.shdd_candidates_op(c32, *ring_args(grid, degree), 12)
    ring = index[torch.isfinite(value)] // grid.nlon
    assert int((ring == 0).sum()) + int((ring == grid.nlat - 1).sum()) == 1, ring
    want, _ = torch_route_candidates(c32, degree, grid, 12)
    torch.testing.assert_close(value, want, rtol=1e-6, atol=0)


def test_the_polar_rule_keeps_the_modes_of_rings_far_from_the_pole():
    # A coarse grid's polar ring can lie far from its pole (67.5 degrees on 4 rings) and hold
    # several modes: the one-per-polar-ring rule holds only for rings close to the pole.
    from locdiff.ops.candidates import one_mode_per_polar_ring

    for degree in (1, 2, 4, 16, 64, 256):
        for kind in ("equiangular", "gauss_legendre"):
            assert one_mode_per_polar_ring(grids.for_degree(degree, kind).theta, degree)
    coarse = grids.equiangular(4, 64)
    assert not one_mode_per_polar_ring(coarse.theta, 16)
    pts = np.array([[67.5, 0.0], [67.5, 90.0], [67.5, -112.5]])
    c = shdd.encode(pts, 16).sum(0)
    ll, v = shdd.top_k(c, 3, grid=coarse)
    want_ll, want_v = shdd.top_k(c, 3)
    np.testing.assert_allclose(v, want_v, rtol=1e-9)
    assert float(locdiff.great_circle_km(ll, want_ll).max()) < 1e-3


@pytest.mark.parametrize("sharpness", [2.0, 11.5, 40.0, 1000.0])
def test_the_density_mode_of_an_exact_shdd_is_its_point(sharpness):
    # The density's mode is found by projecting softmax(f / t) on a grid: one too coarse for
    # the softmax's lobe moved answers by 6-66 km (docs/model.md, "Point predictions").
    from locdiff.models import CSUNet, CSUNetConfig
    from locdiff.predict import Predictor
    from locdiff.run import RunConfig

    L = 16
    config = RunConfig(CSUNetConfig(degree=L, emb_dim=2, widths=(8,), cond_dim=8, emb_widths=()))
    pred = Predictor(CSUNet(config.model), config)
    g = torch.Generator().manual_seed(5)
    pts = torch.rand(60, 2, generator=g, dtype=torch.float64) * torch.tensor([170.0, 360.0]) - \
        torch.tensor([85.0, 180.0])
    t = (L + 1) ** 2 / (4 * math.pi) / sharpness
    got = pred.locate(shdd.encode(pts, L), mode_of="density", temperature=t)
    assert float(locdiff.great_circle_km(got, pts.numpy()).max()) < 4.0
    # At the poles a lobe falls inside the first ring: equal-angle rings moved these 0.5-5 km.
    poles = torch.tensor([[90.0, 0.0], [-90.0, 0.0], [89.9, 33.0], [89.0, -120.0], [-88.7, 179.9]], dtype=torch.float64)
    got = pred.locate(shdd.encode(poles, L), mode_of="density", temperature=t)
    assert float(locdiff.great_circle_km(got, poles.numpy()).max()) < 0.1


def test_density_modes_are_found_in_chunks_that_bound_memory(monkeypatch):
    # At high degree the projection grid holds millions of points (19 M at L = 300): rows go
    # in chunks sized by DENSITY_CHUNK_BYTES, with the same answers.
    from locdiff import predict
    from locdiff.models import CSUNet, CSUNetConfig
    from locdiff.run import RunConfig

    config = RunConfig(CSUNetConfig(degree=16, emb_dim=2, widths=(8,), cond_dim=8, emb_widths=()))
    pred = predict.Predictor(CSUNet(config.model), config)
    c = shdd.encode(torch.tensor([[10.0, 20.0], [-40.0, 100.0], [70.0, -30.0]], dtype=torch.float64), 16)
    c = c + 0.05 * torch.randn(c.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = pred.locate(c, mode_of="density", temperature=2.0)
    sizes = []
    real = shdd.density
    monkeypatch.setattr(predict, "DENSITY_CHUNK_BYTES", 1)
    monkeypatch.setattr(shdd, "density", lambda rows, *a, **kw: sizes.append(len(rows)) or real(rows, *a, **kw))
    np.testing.assert_array_equal(pred.locate(c, mode_of="density", temperature=2.0), whole)
    assert sizes == [1, 1, 1]


@pytest.mark.parametrize("degree, sharpness", [(16, 16.0), (16, 40.0), (64, 16.0), (64, 40.0), (16, 300.0),
                                               (4, 1000.0)])
def test_the_default_normalizer_holds_at_the_poles(degree, sharpness):
    # An exact SHDD's normaliser is the same at every point (the kernel is a function of the
    # angle alone), so a 1-D integral in cos(angle) is the reference. Equal-angle rings
    # missed it by 0.06-0.18 nats at the poles, a 4x grid by 5-24 nats at sharpness 300-1000.
    from scipy.integrate import quad
    from scipy.special import eval_legendre

    f0 = (degree + 1) ** 2 / (4 * math.pi)
    t = f0 / sharpness
    ells = np.arange(degree + 1)

    def density(x):
        return math.exp(float(np.sum((2 * ells + 1) * eval_legendre(ells, x))) / (4 * math.pi) / t - sharpness)

    pieces = np.concatenate([[-1.0], np.cos(np.linspace(math.pi, 0, 400)[1:-1]), [1.0]])
    total = sum(quad(density, a, b, epsabs=0, epsrel=1e-12, limit=200)[0] for a, b in zip(pieces[:-1], pieces[1:]))
    reference = math.log(2 * math.pi * total) + sharpness
    lat = np.array([90.0, -90.0, 89.5, 88.0, 45.0, 0.0])
    c = shdd.encode(np.stack([lat, np.full_like(lat, 10.0)], 1), degree)
    np.testing.assert_allclose(shdd.log_normalizer(c, temperature=t), reference, rtol=0, atol=0.04)


def test_kl_of_large_vectors_keeps_its_digits_or_is_refused():
    # Once the target is a one-cell delta its KL no longer changes with its scale; float64
    # keeps that up to |f| / t ~ 1e12, and past it the KL went negative (-19 at 1e18).
    from locdiff.diffusion import DiffusionConfig
    from locdiff.diffusion.losses import shdd_kl

    c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 8)
    c2 = shdd.encode(torch.tensor([[7.0, 17.0]], dtype=torch.float64), 8)
    kls = [float(shdd.kl_divergence(c2, c * s, temperature=0.9)) for s in (1e6, 1e8, 1e10, 1e11)]
    assert max(kls) - min(kls) < 1e-4 and min(kls) > 0
    for big in ("pred", "target"):
        args = (c2 * 1e18, c) if big == "pred" else (c2, c * 1e18)
        with pytest.raises(ValueError, match=rf"{big} row 0: \|f\| / temperature may reach 7.\d+e\+18, past 1e\+12"):
            shdd.kl_divergence(*args, temperature=0.9)
    # In training such a prediction is a diverging network: a NaN loss, which the loop skips.
    pred = (c2 * 1e30).float().requires_grad_(True)
    loss = shdd_kl(pred, c.float(), 8, DiffusionConfig())
    assert math.isnan(float(loss.detach()))
    loss.backward()
