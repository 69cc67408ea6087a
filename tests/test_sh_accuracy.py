"""Accuracy of locdiff.spherical_harmonics against exact references (docs/conventions.md, "Accuracy"):
float64 within 1e-11 and float32 within 2e-6, per unit of sqrt((2l+1)/(4 pi)), for every
degree up to 2048, poles included, never NaN or inf."""
import math

import numpy as np
import pytest
import scipy.special
import torch

import locdiff
from locdiff.ops import spherical_harmonics_backward_op
from locdiff.testing import SH_ACCURACY
from sh_exact import column_exact, legenp_exact

pytestmark = pytest.mark.usefixtures("at_most_two_threads")

HARD_POINTS = {
    "north pole": [0.0, 0.0, 1.0],
    "south pole": [0.0, 0.0, -1.0],
    "near pole": [1e-9, -2e-9, 1.0],
    "very near pole": [3e-160, 1e-170, -1.0],
    # s * seed underflows to 0 (the scaled-seed loop once never ended here) or a subnormal
    "ultra near pole": [1e-120, -2e-120, 1.0],
    "subnormal offset": [5e-324, 1e-310, -1.0],
    "antimeridian +": [-1.0, 1e-17, 0.2],
    "antimeridian -": [-1.0, -1e-17, -0.2],
    "equator": [0.0, 1.0, 0.0],
    "scaled": [3e5, -2e5, 7e5],
}
ORDERS = [0, 1, 2, 7, 64, 300, 700, 1000, 1400, 1800, 1990, 2047, 2048]


def random_points(rng, n):
    p = rng.normal(size=(n, 3))
    # add points near the poles, where the seed s^m underflows at high order
    p[: n // 2, :2] *= 10.0 ** rng.uniform(-4, -1, size=(n // 2, 1))
    return p


def per_degree_error(values, exact, degree):
    worst = 0.0
    for (l, m), v in exact.items():
        scale = math.sqrt((2 * l + 1) / (4 * math.pi))
        worst = max(worst, abs(float(values[l * l + l + m]) - v) / scale)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degree_2048_against_mpmath(dtype, rng):
    degree = 2048
    names = list(HARD_POINTS) + ["random"] * 4
    points = np.concatenate([np.array(list(HARD_POINTS.values())), random_points(rng, 4)])
    for name, p in zip(names, points):
        xyz = torch.tensor(p, dtype=dtype)
        y = locdiff.spherical_harmonics(xyz, degree)
        assert torch.isfinite(y).all(), name
        given = xyz.double().tolist()  # the reference sees the input exactly as rounded
        for m in ORDERS:
            err = per_degree_error(y, column_exact(given, m, degree), degree)
            assert err <= SH_ACCURACY[dtype], f"{name} {given} m={m}: error {err:.3g}"


def check_hard_and_random_points(degree, dtype, orders, rng):
    """The hard points and six random ones (two full blocks of eight) against mpmath."""
    names = list(HARD_POINTS) + ["random"] * 6
    points = np.concatenate([np.array(list(HARD_POINTS.values())), random_points(rng, 6)])
    y = locdiff.spherical_harmonics(torch.tensor(points, dtype=dtype), degree)
    assert torch.isfinite(y).all()
    for i, name in enumerate(names):
        given = torch.tensor(points[i], dtype=dtype).double().tolist()
        for m in orders:
            err = per_degree_error(y[i], column_exact(given, m, degree), degree)
            assert err <= SH_ACCURACY[dtype], f"{name} {given} m={m}: error {err:.3g}"


# At low degree the CPU forward computes full blocks in vector registers: four points at a
# time up to L = 3, and on CPUs with AVX2 up to L = 20 (float64 from L = 4, float32 from
# L = 6; csrc/cpu/sh_register_group.h), eight at a time in float32 arithmetic for float32 at
# L = 3-5 (csrc/cpu/sh_float_lanes.h), and falls back to its block kernel for partial blocks
# and rows that need scaling.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5, 6, 9, 16, 20])
def test_register_kernel_degrees_against_mpmath(degree, dtype, rng):
    check_hard_and_random_points(degree, dtype, range(degree + 1), rng)


# The CPU forward runs points in SIMD lanes, degree by degree, from L = 21 (float64) or 25
# (float32) to L = 320, or 512 on Intel CPUs given a block of 8 points per thread
# (csrc/cpu/sh_cpu_small.h), in the Cartesian form with the plain recurrence: its errors
# grow toward the poles and with the degree, so check both ends. (16 points here: two
# blocks, so L = 512 takes the lanes where they run to 512 with up to two threads.)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [21, 25, 64, 320, 512])
def test_lane_kernel_degrees_against_mpmath(degree, dtype, rng):
    orders = sorted({0, 1, 2, 3, 4, 5, degree // 3, degree // 2, degree - 4, degree - 3, degree - 1, degree})
    check_hard_and_random_points(degree, dtype, orders, rng)


# Up to two points per thread take the per-point kernel at every degree above the small ones
# (sh_cpu.cpp few_points), in float32 as in float64: one point at a time here.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [21, 64, 320])
def test_single_points_against_mpmath(degree, dtype, rng):
    points = np.concatenate([np.array(list(HARD_POINTS.values())), random_points(rng, 2)])
    for p in points:
        y = locdiff.spherical_harmonics(torch.tensor(p[None], dtype=dtype), degree)[0]
        given = torch.tensor(p, dtype=dtype).double().tolist()
        for m in sorted({0, 1, 5, degree // 2, degree}):
            err = per_degree_error(y, column_exact(given, m, degree), degree)
            assert err <= SH_ACCURACY[dtype], f"{given} m={m}: error {err:.3g}"


@pytest.mark.parametrize("degree", [128, 320, 512])
def test_lane_degrees_near_the_poles_against_mpmath(degree, rng):
    # The lanes' plain recurrence loses ~l^2 ulp within ~0.01 rad of an axis (1.13e-11 per
    # unit at L = 320, over the contract), so float64 points within 0.063 rad are computed
    # again by the per-point kernel (Reinsch's form): there the error is ~1e-14, and 1e-12
    # is the bound that the plain recurrence fails (9e-12 at these angles).
    angles = np.array([1e-7, 3e-6, 1.7e-5, 4e-4, 3e-3, 0.02, 0.05, 0.062])
    phi = rng.uniform(0, 2 * np.pi, size=angles.size)
    sign = np.where(np.arange(angles.size) % 2 == 0, 1.0, -1.0)
    points = np.stack([np.sin(angles) * np.cos(phi), np.sin(angles) * np.sin(phi), sign * np.cos(angles)], -1)
    # eight more points away from the axes, so that L = 512 takes the lanes (see above)
    y = locdiff.spherical_harmonics(torch.tensor(np.concatenate([points, rng.normal(size=(8, 3))])), degree)
    for i, p in enumerate(points.tolist()):
        for m in (0, 1, 2, degree // 2):
            err = per_degree_error(y[i], column_exact(p, m, degree), degree)
            assert err <= 1e-12, f"{p} (angle {angles[i]:.1e}) m={m}: error {err:.3g}"


def test_lane_backward_near_the_poles_matches_the_per_point_kernel(rng):
    # The backward's lanes (to L = 288) share the forward's near-axis loss, so points within
    # 0.063 rad of an axis are recomputed by the per-point kernel (Reinsch's form). The
    # per-point kernel runs every point from L = 289: there, an incoming gradient that is
    # zero at degree 289 gives the same VJP as at 288, so the two must agree to rounding.
    # (Before the recompute they differed by up to 6.3e-12 of the gradient near the axis;
    # against the exact VJP by mpmath, 3.7e-13 to 4e-12 at 3e-3 rad, per point <= 2.4e-13.)
    degree = 288
    angles = np.array([1e-6, 4e-4, 3e-3, 0.02, 0.05, 0.062])
    phi = rng.uniform(0, 2 * np.pi, size=angles.size)
    sign = np.where(np.arange(angles.size) % 2 == 0, 1.0, -1.0)
    xyz = torch.tensor(np.stack([np.sin(angles) * np.cos(phi), np.sin(angles) * np.sin(phi), sign * np.cos(angles)], -1))
    g = torch.tensor(rng.normal(size=(angles.size, (degree + 1) ** 2)))
    lanes = spherical_harmonics_backward_op(xyz, g, degree)
    padded = torch.cat([g, torch.zeros(angles.size, 2 * degree + 3, dtype=torch.float64)], 1)
    per_point = spherical_harmonics_backward_op(xyz, padded, degree + 1)
    err = (lanes - per_point).abs().amax(-1) / per_point.abs().amax(-1)
    assert bool((err <= 1e-14).all()), err.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [2, 3, 4, 5, 12, 20, 21, 40, 320])
def test_partial_point_blocks_match_full_blocks(degree, dtype, rng):
    # Lanes hold 8 points and leave in halves of 4; a batch of n points ends in a block of
    # n mod 8, whose stores are cut per point. From L = 21 (float64) or 25 (float32), up to
    # two points per thread take the per-point kernel instead (sh_cpu.cpp few_points): n = 1,
    # 3 and 4 here, on two threads, must agree with the lanes to the same bound. (Such a block normalises its points by the
    # careful path: its directions may differ from a full block's by a few ulp, which moves
    # Y_lm by up to about eps l per unit of sqrt((2l+1)/4pi): the bound below, per value.)
    xyz = torch.tensor(rng.normal(size=(16, 3)), dtype=dtype)
    full = locdiff.spherical_harmonics(xyz, degree).double()
    l = torch.arange(degree + 1, dtype=torch.float64).repeat_interleave(2 * torch.arange(degree + 1) + 1)
    unit = torch.sqrt((2 * l + 1) / (4 * math.pi))
    # float64: 32 eps (l + 1), where the worst of 3000 seeds at L = 40 was 18 (8, the bound
    # here once, failed one seed in 60; under 1e-11 per unit still at L = 320); float32: one
    # rounding of the output more, except at L = 3-5, where full blocks of float32 are
    # computed in float32 (sh_float_lanes.h: within 6e-7 per unit of the float64 values)
    bound = 32 * 2.0**-52 * (l + 1) if dtype == torch.float64 else 2.0**-22 * torch.ones_like(l)
    if dtype == torch.float32 and 3 <= degree <= 5:
        bound = 1e-6 * torch.ones_like(l)
    for n in [1, 3, 4, 5, 7, 9, 12, 13]:
        err = (locdiff.spherical_harmonics(xyz[:n], degree).double() - full[:n]).abs() / unit
        assert bool((err <= bound).all()), (n, float((err / bound).max()))


@pytest.mark.parametrize("degree", [0, 1, 5, 33, 120])
def test_all_orders_against_mpmath(degree, rng):
    p = random_points(rng, 3)
    y = locdiff.spherical_harmonics(torch.tensor(p), degree)
    for i in range(len(p)):
        for m in range(degree + 1):
            err = per_degree_error(y[i], column_exact(p[i].tolist(), m, degree), degree)
            assert err <= 1e-11, (p[i], m, err)


def test_spot_checks_against_hypergeometric_form(rng):
    """An independent formula (hypergeometric series) at moderate degree."""
    p = rng.normal(size=3)
    y = locdiff.spherical_harmonics(torch.tensor(p), 300)
    for l, m in [(0, 0), (1, -1), (17, 5), (100, -60), (250, 3), (300, -299)]:
        assert abs(float(y[l * l + l + m]) - legenp_exact(p.tolist(), l, m)) < 1e-11 * math.sqrt(2 * l + 1)


def test_against_scipy(rng):
    degree = 30
    lat = rng.uniform(-89, 89, 50)
    lon = rng.uniform(-180, 180, 50)
    xyz = locdiff.latlon_to_xyz(np.stack([lat, lon], -1))
    y = locdiff.spherical_harmonics(xyz, degree)
    theta, phi = np.radians(90 - lat), np.radians(lon)
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            c = scipy.special.sph_harm_y(l, abs(m), theta, phi) * (-1) ** abs(m)  # drop CS phase
            expected = c.real if m == 0 else math.sqrt(2) * (c.real if m > 0 else c.imag)
            np.testing.assert_allclose(y[:, l * l + l + m], expected, atol=1e-12)


@pytest.mark.parametrize("degree", [10, 200, 1000])
def test_addition_theorem(degree, rng):
    a, b = rng.normal(size=(2, 20, 3))
    ya = locdiff.spherical_harmonics(torch.tensor(a), degree)
    yb = locdiff.spherical_harmonics(torch.tensor(b), degree)
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    for l in [0, 1, degree // 3, degree]:
        lhs = (ya[:, l * l : (l + 1) ** 2] * yb[:, l * l : (l + 1) ** 2]).sum(-1).numpy()
        rhs = (2 * l + 1) / (4 * np.pi) * scipy.special.eval_legendre(l, cos)
        np.testing.assert_allclose(lhs, rhs, atol=1e-11 * (2 * l + 1))


def test_orthonormal_by_gauss_legendre_quadrature():
    degree = 40
    nodes, weights = np.polynomial.legendre.leggauss(degree + 1)
    nlon = 2 * degree + 1
    phi = 2 * np.pi * np.arange(nlon) / nlon
    z = np.repeat(nodes, nlon)
    s = np.sqrt(1 - z**2)
    ph = np.tile(phi, degree + 1)
    xyz = np.stack([s * np.cos(ph), s * np.sin(ph), z], -1)
    w = np.repeat(weights, nlon) * (2 * np.pi / nlon)
    y = locdiff.spherical_harmonics(xyz, degree)
    gram = y.T @ (w[:, None] * y)
    np.testing.assert_allclose(gram, np.eye((degree + 1) ** 2), atol=1e-12)


@pytest.mark.parametrize("degree", [3, 4, 5])
def test_float32_arithmetic_degrees_match_float64(degree, rng):
    # float32 at L = 3-5 is computed in float32 arithmetic (csrc/cpu/sh_float_lanes.h): its
    # error grows with the degree and toward the axes (z's rounding times the slope of
    # Qbar_l1), so check many points, half of them near an axis (random_points), half of
    # the rest near the equator, against float64 at the same rounded input. Over 400000
    # such points the worst was 2.8e-7, 4.3e-7 and 5.9e-7 per unit at L = 3, 4, 5.
    p = random_points(rng, 20000)
    p[15000:, 2] *= 10.0 ** rng.uniform(-6, -1, size=5000)
    xyz = torch.tensor(p, dtype=torch.float32)
    y32 = locdiff.spherical_harmonics(xyz, degree)
    y64 = locdiff.spherical_harmonics(xyz.double(), degree)
    l = torch.arange(degree + 1, dtype=torch.float64).repeat_interleave(2 * torch.arange(degree + 1) + 1)
    err = ((y32.double() - y64).abs() / torch.sqrt((2 * l + 1) / (4 * math.pi))).max()
    assert err <= 1e-6 < SH_ACCURACY[torch.float32], float(err)


def test_float32_matches_float64_at_the_rounded_input(rng):
    p = torch.tensor(random_points(rng, 64), dtype=torch.float32)
    y32 = locdiff.spherical_harmonics(p, 700)
    y64 = locdiff.spherical_harmonics(p.double(), 700)
    scale = torch.sqrt((2 * torch.arange(701, dtype=torch.float64) + 1) / (4 * math.pi))
    scale = scale.repeat_interleave(2 * torch.arange(701) + 1)
    assert ((y32.double() - y64).abs() / scale).max() <= SH_ACCURACY[torch.float32]


def test_no_nan_or_inf_at_extreme_inputs():
    pts = torch.tensor([[0, 0, 1e-300], [1e300, 1e300, 1e300], [5e-324, 0, 0], [0, 0, -1e308], [1, 1e-300, 0]],
                       dtype=torch.float64)
    for degree in [4, 64, 2048]:  # the small-degree, lanes and per-point kernels
        y = locdiff.spherical_harmonics(pts, degree)
        assert torch.isfinite(y).all()
        # scaling the vector never changes the result
        torch.testing.assert_close(y[1], locdiff.spherical_harmonics(torch.ones(3, dtype=torch.float64), degree),
                                   rtol=0, atol=1e-13)
        torch.testing.assert_close(y[2], locdiff.spherical_harmonics(torch.tensor([1.0, 0, 0]).double(), degree),
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [1, 2, 3, 4, 8, 17, 32, 33, 100])
def test_extreme_rows_inside_full_blocks(degree, dtype, rng):
    # The low-degree kernel normalises 8 rows at a time, with a fast path for blocks of
    # ordinary rows; a block holding one huge or tiny row must take the careful path for the
    # whole block and still give every row the value of its direction.
    unit = rng.normal(size=(40, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    scaled = unit.copy()
    # huge, tiny, and (float64) just below the fast path's 2^-500 bound
    scales = [1e30, 1e-30, 1e-33] if dtype == torch.float32 else [1e300, 1e-300, 2.0**-510]
    scaled[[3, 17, 30]] *= np.array(scales)[:, None]
    y = locdiff.spherical_harmonics(torch.tensor(scaled, dtype=dtype), degree)
    expected = locdiff.spherical_harmonics(torch.tensor(unit, dtype=torch.float64), degree)
    atol = 1e-13 if dtype == torch.float64 else 2e-6
    # The two paths may round a row's direction differently by an ulp, which moves Y_l by the
    # Legendre slope: at most l (l + 1) near the poles (Markov), l / sin(theta) elsewhere
    # (Bernstein), times the normalisation sqrt((2l + 1) / 4 pi).
    sin_theta = np.sqrt(np.maximum(1 - unit[:, 2] ** 2, 1e-300))
    slope = np.minimum(degree * (degree + 1.0), degree / sin_theta) * math.sqrt((2 * degree + 1) / (4 * math.pi))
    tol = atol * math.sqrt(2 * degree + 1) + torch.finfo(dtype).eps * torch.tensor(slope)[:, None]
    err = (y.double() - expected).abs()
    assert (err <= tol).all(), f"row {int((err - tol).max(1).values.argmax())}: {float(err.max()):.3g} off"


@pytest.mark.parametrize("degree", [2, 4, 40])
def test_bad_row_inside_a_full_block_is_named(degree, rng):
    xyz = torch.tensor(rng.normal(size=(64, 3)))
    xyz[13] = torch.tensor([0.0, float("nan"), 1.0])
    xyz[40] = 0.0
    with pytest.raises(ValueError, match="xyz row 13 is non-finite"):
        locdiff.spherical_harmonics(xyz, degree)


# The tests of the low-degree CPU forward, rerun with LOCDIFF_CPU_PORTABLE=1: the path of
# CPUs without AVX2 (register groups to L = 16 in float64 and 3 in float32, the block kernel
# above them, its own choice of streamed degrees), which CI's AVX2 hosts never take otherwise.
PORTABLE_PATH_TESTS = [
    "tests/test_sh_accuracy.py::test_register_kernel_degrees_against_mpmath",
    "tests/test_sh_accuracy.py::test_partial_point_blocks_match_full_blocks",
    "tests/test_sh_accuracy.py::test_extreme_rows_inside_full_blocks",
    "tests/test_sh_accuracy.py::test_bad_row_inside_a_full_block_is_named",
    "tests/test_sh_api.py::test_matches_reference",
    "tests/test_sh_api.py::test_large_outputs_streamed_out_match",
    "tests/test_sh_api.py::test_thread_count_does_not_change_results",
]


def test_portable_cpu_path_passes_the_low_degree_tests():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SEED

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, LOCDIFF_CPU_PORTABLE="1", LOCDIFF_TEST_SEED=str(SEED))
    probe = "from locdiff import _C; print(_C.sh_cpu_forward_path())"
    path = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert path.stdout.strip() == "portable"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PORTABLE_PATH_TESTS],
                         cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
