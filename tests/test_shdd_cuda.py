"""SHDD on CUDA against the CPU kernels: ring synthesis, the SHDD-KL loss and its backward,
and the whole decode / top-k / density path. Skips without a GPU and a CUDA build."""
from __future__ import annotations

import math

import pytest
import torch

import locdiff
from locdiff import grids, shdd
from locdiff.testing import assert_close, devices
from shdd_helpers import torch_route_candidates

pytestmark = pytest.mark.skipif("cuda" not in devices(), reason="needs a GPU and a CUDA build of locdiff")


def _latlon(n, seed):
    g = torch.Generator().manual_seed(seed)
    lat = torch.asin(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 180 / math.pi
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    poles = torch.tensor([[90.0, 0.0], [-90.0, 0.0], [10.0, 180.0]], dtype=torch.float64)
    return torch.cat([poles, torch.stack([lat, lon], -1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [4, 16, 33])
def test_synth_and_kl_match_cpu(degree, dtype):
    g = torch.Generator().manual_seed(degree)
    pred = torch.randn(6, (degree + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    target = shdd.encode(_latlon(3, degree), degree).to(dtype)
    grid = grids.for_degree(degree)
    assert_close(shdd.grid_values(pred.cuda(), grid).cpu(), shdd.grid_values(pred, grid))
    p = pred.cuda().requires_grad_(True)
    kl = shdd.kl_divergence(p, target.cuda(), temperature=0.5, reduction="sum")
    kl.backward()
    q = pred.clone().requires_grad_(True)
    kl_cpu = shdd.kl_divergence(q, target, temperature=0.5, reduction="sum")
    kl_cpu.backward()
    assert_close(kl.detach().cpu(), kl_cpu.detach())
    assert_close(p.grad.cpu(), q.grad)


@pytest.mark.parametrize("degree", [8, 32, 64])
def test_decode_top_k_density_match_cpu(degree):
    truth = _latlon(29, degree)
    exact = shdd.encode(truth, degree)
    got = shdd.decode(exact.cuda())
    assert got.device.type == "cuda"
    assert float(locdiff.great_circle_km(got.cpu(), truth).max()) < 1e-3  # under a metre
    g = torch.Generator().manual_seed(degree)
    noisy = exact + 0.5 * torch.randn(exact.shape, generator=g, dtype=torch.float64)
    # The same modes (the GPU refines in torch, the CPU in C++: values agree to rounding).
    ll_gpu, v_gpu = shdd.top_k(noisy.cuda(), 3)
    ll_cpu, v_cpu = shdd.top_k(noisy, 3)
    ok = torch.isfinite(v_cpu)
    torch.testing.assert_close(v_gpu.cpu()[ok], v_cpu[ok], rtol=0, atol=1e-9 * float(v_cpu[ok].abs().max()))
    p = shdd.density(noisy.cuda(), temperature=0.3)
    assert_close(p.cpu(), shdd.density(noisy, temperature=0.3))


@pytest.mark.parametrize("degree", [8, 64, 256])
def test_triton_grid_stage_matches_the_torch_route(degree):
    pytest.importorskip("triton")
    from locdiff.ops.triton.shdd_triton import ring_candidates_triton

    truth = _latlon(61, degree)
    g = torch.Generator().manual_seed(degree)
    c = shdd.encode(truth, degree)
    c = (c + 0.3 * torch.randn(c.shape, generator=g, dtype=torch.float64)).float().cuda()
    grid = grids.for_degree(degree)
    value, index = ring_candidates_triton(c, grid.legendre_table(degree, "cuda"), degree, grid.nlat, grid.nlon,
                                          grid.lon0, 32)
    want, want_xyz = torch_route_candidates(c, degree, grid, 32)
    scale = float(want[:, 0].abs().max())
    ok = torch.isfinite(want)
    assert torch.equal(torch.isfinite(value), ok)
    assert float((value[ok] - want[ok]).abs().max()) <= 1e-5 * scale
    # The best candidate is the same grid point wherever the runner-up is clearly lower.
    clear = (want[:, 0] - want[:, 1]) > 1e-4 * scale
    same = (grid.xyz.cuda()[index[:, 0]] - want_xyz[:, 0].to(grid.xyz.dtype)).abs().amax(-1) == 0
    assert bool(same[clear].all())
    exact = shdd.encode(truth, degree)
    got = shdd.decode(exact.cuda(), backend="triton")
    assert float(locdiff.great_circle_km(got.cpu(), truth).max()) < 1e-3


@pytest.mark.parametrize("degree", [64, 256])
def test_triton_f_and_gradient_match_cpu(degree):
    pytest.importorskip("triton")
    from locdiff.ops.shdd import shdd_eval_op
    from locdiff.ops.triton import sh_dot_and_gradient_triton

    g = torch.Generator().manual_seed(degree)
    c = torch.randn(8, (degree + 1) ** 2, generator=g, dtype=torch.float64)
    xyz = torch.cat([torch.tensor([[0.0, 0, 1], [0, 0, -1], [-1, 1e-17, 0.2]], dtype=torch.float64),
                     torch.randn(300, 3, generator=g, dtype=torch.float64)])
    row = torch.randint(0, 8, (xyz.shape[0],), generator=g)
    f, grad = sh_dot_and_gradient_triton(c.cuda(), xyz.cuda(), row.cuda(), degree)
    want_f, want_grad = shdd_eval_op(c, xyz, row, degree)
    scale = float(c.abs().sum(-1).max()) * (degree + 1)
    assert float((f.cpu() - want_f).abs().max()) <= 1e-14 * scale
    assert float((grad.cpu() - want_grad).abs().max()) <= 1e-14 * scale * (degree + 1)


@pytest.mark.parametrize("degree", [64, 256])
def test_triton_refinement_matches_the_cpp_kernel(degree):
    pytest.importorskip("triton")
    from locdiff.geo import latlon_to_xyz
    from locdiff.ops.shdd import shdd_refine_op
    from locdiff.ops.triton import refine_triton

    g = torch.Generator().manual_seed(degree)
    truth = _latlon(200, degree)
    c = shdd.encode(truth, degree) + 0.02 * torch.randn(len(truth), (degree + 1) ** 2, generator=g,
                                                       dtype=torch.float64)
    start = latlon_to_xyz(truth) + 0.3 / degree * torch.randn(len(truth), 3, generator=g, dtype=torch.float64)
    row = torch.arange(len(truth))
    r = grids.half_max_radius(degree)
    u, f = refine_triton(c.cuda(), degree, row.cuda(), start.cuda(), r)
    want_u, want_f = shdd_refine_op(c, start.contiguous(), row, degree, r, 40)
    scale = float(c.abs().sum(-1).max())
    assert float((u.cpu() - want_u).abs().max()) < 1e-8
    assert float((f.cpu() - want_f).abs().max()) < 1e-12 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [5, 33])
def test_gradients_through_synthesis_match_cpu(degree, dtype):
    # grid_values, density and log_density_at backpropagate through locdiff::shdd_adjoint.
    g = torch.Generator().manual_seed(degree)
    c = torch.randn(5, (degree + 1) ** 2, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(5, grids.for_degree(degree).size, generator=g, dtype=torch.float64).to(dtype)
    grads = []
    for device in ("cpu", "cuda"):
        x = c.to(device).requires_grad_(True)
        (shdd.density(x, temperature=0.7) * w.to(device)).sum().backward()
        y = c.to(device).requires_grad_(True)
        (shdd.grid_values(y) * w.to(device)).sum().backward()
        grads.append((x.grad.cpu(), y.grad.cpu()))
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][1], grads[0][1])


def test_adjoint_gradcheck_float64():
    from locdiff.ops.shdd import shdd_adjoint_op, shdd_synth_op
    from shdd_helpers import ring_args

    grid = grids.equiangular(9, 16)
    a = ring_args(grid, 4, "cuda")
    c = torch.randn(3, 25, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(3, grid.size, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: shdd_synth_op(x, *a), (c,))
    assert torch.autograd.gradcheck(lambda x: shdd_adjoint_op(x, *a), (w,))


def test_degree_past_48_kib_of_shared_memory():
    # 32 (L+1) bytes of shared memory per block: L = 1600 needs the opt-in beyond 48 KiB.
    degree = 1600
    grid = grids.equiangular(4, 4096)
    c = torch.zeros(1, (degree + 1) ** 2, dtype=torch.float64)
    c[0, 0], c[0, degree * degree + degree + 7], c[0, 50 * 50 + 50 - 3] = 1.0, 0.5, 0.25
    f = shdd.grid_values(c.cuda(), grid)
    assert_close(f.cpu(), shdd.grid_values(c, grid))


def test_inputs_on_two_devices_are_named_errors():
    c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 8)
    with pytest.raises(ValueError, match="pred is on cuda.*target is on cpu|target is on"):
        shdd.kl_divergence(c.cuda(), c)
    from locdiff.ops.shdd import shdd_kl_op
    from shdd_helpers import ring_args

    with pytest.raises(ValueError, match="target is on cpu"):
        shdd_kl_op(c.cuda(), c, *ring_args(grids.for_degree(8), 8, "cuda"), 1.0)


def test_gallery_search_on_the_gpu_matches_the_cpu():
    # LocDiff-H's neighbour search runs where the model does; its results come back on the CPU.
    import numpy as np

    from locdiff.baselines.knn import NeighbourIndex

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5000, 32)).astype(np.float32)
    coords = np.stack([rng.uniform(-80, 80, 5000), rng.uniform(-180, 180, 5000)], 1)
    query = rng.normal(size=(300, 32)).astype(np.float32)
    s_cpu, j_cpu = NeighbourIndex(emb, coords).search(query, 10)
    s_gpu, j_gpu = NeighbourIndex(emb, coords, device="cuda").search(query, 10)
    assert s_gpu.device.type == "cpu" and torch.equal(j_gpu, j_cpu)
    torch.testing.assert_close(s_gpu, s_cpu, atol=1e-5, rtol=0)
