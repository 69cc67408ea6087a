"""The fused Triton grid stage of the decode (locdiff.ops.triton.shdd_triton) on the CPU,
under TRITON_INTERPRET=1, against the torch route it replaces (shdd synthesis, then
ring_local_maxima and topk) and through decode / top_k.

The interpreted tests run in a subprocess that sets TRITON_INTERPRET=1 (see
triton_interpreter.py). Small sizes only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from locdiff import grids, shdd  # noqa: E402
from locdiff.geo import great_circle_km  # noqa: E402
from locdiff.ops.candidates import one_mode_per_polar_ring  # noqa: E402
from shdd_helpers import torch_route_candidates  # noqa: E402
from triton_interpreter import needs_interpreter, run_interpreted  # noqa: E402



def test_interpreter_suite():
    """Runs this file's tests in a subprocess with TRITON_INTERPRET=1."""
    run_interpreted(__file__)


def _noisy(latlon, degree, noise, seed):
    g = torch.Generator().manual_seed(seed)
    c = shdd.encode(torch.tensor(latlon, dtype=torch.float64), degree)
    return c + noise * torch.randn(c.shape, generator=g, dtype=torch.float64)


HARD = [[90.0, 0.0], [-90.0, 0.0], [-89.5, 179.9], [10.0, 180.0], [0.0, -179.99]]


@needs_interpreter
@pytest.mark.parametrize("grid,degree", [
    (grids.for_degree(6), 6),              # two bands, the equator between northern rows
    (grids.equiangular(13, 32), 10),       # odd ring count: the equatorial ring has no mirror
    (grids.gauss_legendre(9, 16), 8),
    (grids.equiangular(16, 64), 20),       # several trigonometric anchors (every 16 orders)
])
@pytest.mark.parametrize("ncand", [5, 8])
def test_candidates_match_the_torch_route(grid, degree, ncand):
    from locdiff.ops.triton.shdd_triton import ring_candidates_triton

    c = _noisy(HARD, degree, 0.3, degree).float()
    table = grid.legendre_table(degree)
    value, index = ring_candidates_triton(c, table, degree, grid.nlat, grid.nlon, grid.lon0, ncand,
                                          one_mode_per_polar_ring(grid.theta, degree))
    want_value, want_xyz = torch_route_candidates(c, degree, grid, ncand)
    assert value.shape == (len(HARD), ncand) and value.dtype == torch.float64
    finite = torch.isfinite(want_value)
    assert torch.equal(torch.isfinite(value), finite)
    scale = float(want_value[:, 0].abs().max())
    assert float((value[finite] - want_value[finite]).abs().max()) <= 2e-6 * scale
    # The same grid points, except where two candidates' values tie to float32 rounding.
    gap = torch.cat([want_value.diff(dim=1).abs(), torch.full((len(HARD), 1), math.inf)], 1)
    gap = torch.minimum(gap, torch.cat([torch.full((len(HARD), 1), math.inf), gap[:, :-1]], 1))
    clear = finite & (gap > 1e-5 * scale)
    assert torch.equal(grid.xyz[index][clear], want_xyz[clear].to(grid.xyz.dtype))


@needs_interpreter
@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_a_lobe_on_a_pole_is_one_candidate(pole):
    # A zonal lobe on the pole makes every polar ring a plateau of exact ties: each ring must
    # give one candidate, its last node, as in the torch route (test_shdd_edges: the C++ scan).
    from locdiff.ops.triton.shdd_triton import ring_candidates_triton

    degree, grid = 12, grids.for_degree(12)
    c = shdd.encode(torch.tensor([pole, 0.0]), degree)
    zonal = torch.zeros_like(c)
    m0 = torch.arange(degree + 1) ** 2 + torch.arange(degree + 1)
    zonal[m0] = c[m0]  # m = 0 only: the exact lobe, every ring constant
    value, index = ring_candidates_triton(zonal[None].float(), grid.legendre_table(degree), degree, grid.nlat,
                                          grid.nlon, grid.lon0, 8, one_per_polar_ring=True)
    want_value, want_xyz = torch_route_candidates(zonal[None].float(), degree, grid, 8)
    finite = torch.isfinite(want_value)
    assert torch.equal(torch.isfinite(value), finite)
    torch.testing.assert_close(value[finite], want_value[finite], rtol=2e-6, atol=0)
    ring = index[finite] // grid.nlon
    polar = (ring == 0) | (ring == grid.nlat - 1)
    assert 1 <= int(polar.sum()) <= 2 and bool((index[finite][polar] % grid.nlon == grid.nlon - 1).all()), index
    # (the side-lobe rings tie too, and the two sorts order their nodes differently)
    assert torch.equal(grid.xyz[index[:, 0]], want_xyz[:, 0].to(grid.xyz.dtype))


@needs_interpreter
@pytest.mark.parametrize("nlat, nlon", [(6, 8), (8, 15)])
def test_fewer_maxima_than_candidates_pad_with_minus_inf(nlat, nlon):
    # nlon 15: a ring is scanned in 16 lanes, and the padding lane's index lay past the grid.
    from locdiff.ops.triton.shdd_triton import ring_candidates_triton

    degree, grid = 2, grids.equiangular(nlat, nlon)
    c = shdd.encode(torch.tensor([[30.0, 40.0]]), degree).float()
    value, index = ring_candidates_triton(c, grid.legendre_table(degree), degree, grid.nlat, grid.nlon,
                                          grid.lon0, 64, one_mode_per_polar_ring(grid.theta, degree))
    want, _ = torch_route_candidates(c, degree, grid, 64)
    assert value.shape == (1, 64) and int(torch.isfinite(value).sum()) == int(torch.isfinite(want).sum()) >= 1
    assert not torch.isfinite(value[0, -1]) and index.min() >= 0 and index.max() < grid.size
    cd = shdd.encode(torch.tensor([[30.0, 40.0]], dtype=torch.float64), 4)
    torch.testing.assert_close(shdd.decode(cd, grid=grid, backend="triton"), shdd.decode(cd, grid=grid))


@needs_interpreter
def test_decode_with_the_triton_grid_stage_and_refinement():
    degree = 8
    truth = torch.tensor(HARD + [[35.0, 139.7]], dtype=torch.float64)
    c = shdd.encode(truth, degree)
    assert float(great_circle_km(shdd.decode(c, backend="triton"), truth).max()) < 1e-3  # under a metre
    noisy = _noisy(truth[:3].tolist(), degree, 0.05, 3)
    assert torch.allclose(shdd.decode(noisy, backend="triton"), shdd.decode(noisy), atol=1e-6)


@needs_interpreter
def test_top_k_with_the_triton_grid_stage():
    degree = 8
    pts = np.array([[50.0, 10.0], [-20.0, -80.0], [5.0, 150.0]])
    c = shdd.encode(pts, degree).sum(0)
    ll, v = shdd.top_k(c, 3, backend="triton")
    want_ll, want_v = shdd.top_k(c, 3)
    np.testing.assert_allclose(v, want_v, rtol=1e-9)
    np.testing.assert_allclose(ll, want_ll, atol=1e-6)


def test_bad_backend():
    c = shdd.encode(np.array([[0.0, 0.0]]), 4)
    for call in (lambda: shdd.decode(c, backend="cuda"), lambda: shdd.top_k(c, 2, backend="fast")):
        with pytest.raises(ValueError, match="backend must be one of"):
            call()


@needs_interpreter
@pytest.mark.parametrize("degree,block_m", [(5, None), (13, 4), (30, None)])  # 13: several passes
def test_fused_f_and_gradient_match_the_cpp_kernel(degree, block_m, monkeypatch):
    from locdiff.ops.shdd import shdd_eval_op
    from locdiff.ops.triton import sh_triton

    if block_m:
        monkeypatch.setattr(sh_triton, "_MAX_BLOCK_M", block_m)
    g = torch.Generator().manual_seed(degree)
    c = torch.randn(4, (degree + 1) ** 2, generator=g, dtype=torch.float64)
    hard = torch.tensor([[0.0, 0, 1], [0, 0, -1], [1e-9, 2e-9, 1], [-1, 1e-17, 0.2], [-1, -1e-17, 0.2]],
                        dtype=torch.float64)
    xyz = torch.cat([hard, 3 * torch.randn(6, 3, generator=g, dtype=torch.float64)])
    row = torch.randint(0, 4, (xyz.shape[0],), generator=g)
    f, grad = sh_triton.sh_dot_and_gradient_triton(c, xyz, row, degree)
    want_f, want_grad = shdd_eval_op(c, xyz, row, degree)
    scale = float(c.abs().sum(-1).max()) * (degree + 1)
    assert float((f - want_f).abs().max()) <= 1e-14 * scale
    assert float((grad - want_grad).abs().max()) <= 1e-14 * scale * (degree + 1)


@needs_interpreter
@pytest.mark.parametrize("degree,block_m", [(6, None), (13, 4), (24, None)])  # 13: several passes
def test_fused_refinement_matches_the_torch_loop_and_the_cpp_kernel(degree, block_m, monkeypatch):
    from locdiff.geo import latlon_to_xyz
    from locdiff.ops.shdd import shdd_refine_op
    from locdiff.ops.shdd_reference import shdd_refine_reference
    from locdiff.ops.triton import refine_triton, sh_triton

    if block_m:
        monkeypatch.setattr(sh_triton, "_MAX_BLOCK_M", block_m)
    g = torch.Generator().manual_seed(degree)
    truth = torch.tensor(HARD + [[33.0, 44.0], [-60.0, -100.0]], dtype=torch.float64)
    c = _noisy(truth.tolist(), degree, 0.05, degree)
    start = latlon_to_xyz(truth) + 0.3 / degree * torch.randn(len(truth), 3, generator=g, dtype=torch.float64)
    row = torch.arange(len(truth))
    r = grids.half_max_radius(degree)
    u, f = refine_triton(c, degree, row, start, r)
    # The same iterations as the torch loop (exact f and gradient) ...
    want_u, want_f = shdd_refine_reference(c, degree, row, start.clone(), r)
    scale = float(c.abs().sum(-1).max())
    assert float((u - want_u).abs().max()) < 1e-12
    assert float((f - want_f).abs().max()) < 1e-13 * scale
    # ... and the same maxima as the C++ kernel (analytic Hessian: other iterates, same end).
    cpp_u, cpp_f = shdd_refine_op(c, start.contiguous(), row, degree, r, 40)
    assert float((u - cpp_u).abs().max()) < 1e-8
    assert float((f - cpp_f).abs().max()) < 1e-12 * scale
    assert torch.allclose(u.norm(dim=-1), torch.ones(len(truth), dtype=torch.float64), atol=1e-15, rtol=0)


@needs_interpreter
def test_fused_refinement_edge_cases():
    from locdiff.ops.triton import refine_triton

    c = shdd.encode(torch.tensor([[90.0, 0.0], [10.0, 180.0]], dtype=torch.float64), 8)
    start = torch.tensor([[0.0, 1e-3, 1.0], [-1.0, 1e-3, 0.17]], dtype=torch.float64)
    u, f = refine_triton(c, 8, torch.tensor([0, 1]), start, grids.half_max_radius(8))
    assert float((u - torch.tensor([[0.0, 0, 1], [-math.cos(math.radians(10)), 0, math.sin(math.radians(10))]],
                                   dtype=torch.float64)).abs().max()) < 1e-9  # to the exact point
    empty_u, empty_f = refine_triton(c, 8, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.float64), 0.1)
    assert empty_u.shape == (0, 3) and empty_f.shape == (0,)
    with pytest.raises(TypeError, match="float64"):
        refine_triton(c.float(), 8, torch.tensor([0]), start[:1], 0.1)
    with pytest.raises(ValueError, match="columns"):
        refine_triton(c, 7, torch.tensor([0]), start[:1], 0.1)
