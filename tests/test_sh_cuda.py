"""CUDA spherical harmonics against the CPU kernel (and Triton against CUDA).

Skips without a GPU or without the CUDA kernels in this build, except for the checks that a
CPU-only build refuses CUDA work instead of computing on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import locdiff
from locdiff import _C
from locdiff.ops import spherical_harmonics_backward_op, spherical_harmonics_op
from locdiff.testing import TOLERANCES, assert_close, devices

HAS_GPU = "cuda" in devices()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and a CUDA build of locdiff")

HARD_POINTS = [
    [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1e-9, -2e-9, 1.0], [3e-160, 1e-170, -1.0],
    [-1.0, 1e-17, 0.2], [-1.0, -1e-17, -0.2], [0.0, 1.0, 0.0], [3e5, -2e5, 7e5],
    [0.37, 0.0, 0.929],  # s ~ 0.37: seeds underflow near degree 2048, columns recover
]
DEGREES = [0, 1, 2, 5, 8, 9, 16, 31, 32, 63, 64, 127, 128, 255, 511, 512, 1000, 2048]


def _points(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3, generator=g, dtype=torch.float64)
    p[: n // 2, :2] *= 10.0 ** (-4 * torch.rand(n // 2, 1, generator=g, dtype=torch.float64))
    return torch.cat([torch.tensor(HARD_POINTS, dtype=torch.float64), p]).to(dtype)


def _n_for(degree):
    # Small enough for the CPU reference to stay quick at high degree.
    return 64 if degree <= 64 else (16 if degree <= 512 else 4)


def _rel_close(got, want, dtype, scale_floor=1.0):
    scale = want.abs().max().clamp_min(scale_floor)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got / scale, want / scale, rtol=tol["rtol"], atol=tol["atol"] * 10)


# ---- builds without CUDA ---------------------------------------------------------------------


@pytest.mark.skipif(_C.has_cuda(), reason="this build has the CUDA kernels")
def test_cpu_only_build_refuses_cuda_entry_points():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.sh_cuda(0, 1, 2, 0, 0, "float32")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.sh_cuda_bwd(0, 0, 1, 2, 0, 0, "float64")


@pytest.mark.skipif(_C.has_cuda() or not torch.cuda.is_available(),
                    reason="needs a GPU and a CPU-only build")
def test_cpu_only_build_raises_on_cuda_tensor():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        locdiff.spherical_harmonics(torch.randn(4, 3, device="cuda"), 3)


# ---- CUDA vs CPU ------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", DEGREES)
def test_forward_matches_cpu(degree, dtype):
    xyz = _points(_n_for(degree), dtype)
    got = spherical_harmonics_op(xyz.cuda(), degree).cpu()
    assert torch.isfinite(got).all()
    assert_close(got, spherical_harmonics_op(xyz, degree))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [0, 1, 4, 8, 9, 20, 33, 100, 130, 600, 2048])
def test_backward_matches_cpu(degree, dtype):
    xyz = _points(_n_for(degree), dtype)
    g = torch.randn(xyz.shape[0], (degree + 1) ** 2, dtype=dtype)
    got = spherical_harmonics_backward_op(xyz.cuda(), g.cuda(), degree).cpu()
    assert torch.isfinite(got).all()
    _rel_close(got, spherical_harmonics_backward_op(xyz, g, degree), dtype)


@needs_gpu
def test_many_points_every_tile_shape():
    # Point counts that leave partial tiles / groups in every kernel layout.
    for degree in (3, 8, 12, 40, 90, 200):
        for n in (1, 7, 129, 1000):
            xyz = _points(n, torch.float64, seed=n)[:n]
            assert_close(spherical_harmonics_op(xyz.cuda(), degree).cpu(),
                         spherical_harmonics_op(xyz, degree))


@needs_gpu
def test_gradcheck_float64():
    xyz = torch.tensor([[0.3, -0.4, 0.8], [0.0, 0.0, 1.0], [-1.0, 1e-17, 0.2]],
                       dtype=torch.float64, device="cuda", requires_grad=True)
    for degree in (3, 12):
        assert torch.autograd.gradcheck(lambda x: locdiff.spherical_harmonics(x, degree), (xyz,))


@needs_gpu
def test_opcheck():
    xyz = _points(8, torch.float64).cuda()
    torch.library.opcheck(spherical_harmonics_op, (xyz, 10))
    torch.library.opcheck(spherical_harmonics_backward_op, (xyz, torch.randn(xyz.shape[0], 121, dtype=torch.float64, device="cuda"), 10))


@needs_gpu
def test_empty_batch():
    for degree in (2, 20, 300):
        x = torch.empty(0, 3, device="cuda", requires_grad=True)
        y = locdiff.spherical_harmonics(x, degree)
        assert y.shape == (0, (degree + 1) ** 2)
        y.sum().backward()
        assert x.grad.shape == (0, 3)


@needs_gpu
def test_non_contiguous_input():
    base = _points(32, torch.float32).cuda()
    xyz = torch.cat([base, base], dim=1)[:, ::2]  # strided view
    assert not xyz.is_contiguous()
    got = locdiff.spherical_harmonics(xyz, 17)
    assert_close(got.cpu(), spherical_harmonics_op(xyz.cpu().contiguous(), 17))


@needs_gpu
def test_two_streams():
    xyz = _points(256, torch.float32).cuda()
    want = {d: spherical_harmonics_op(xyz, d) for d in (6, 70)}
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s1):
        a = spherical_harmonics_op(xyz, 6)
    with torch.cuda.stream(s2):
        b = spherical_harmonics_op(xyz, 70)
    torch.cuda.synchronize()
    assert torch.equal(a, want[6]) and torch.equal(b, want[70])


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    xyz = _points(64, torch.float64)
    for degree in (5, 50, 300):
        got = locdiff.spherical_harmonics(xyz.to("cuda:1"), degree)
        assert got.device == torch.device("cuda:1")
        assert_close(got.cpu(), spherical_harmonics_op(xyz, degree))


@needs_gpu
def test_torch_compile_matches_eager():
    xyz = _points(64, torch.float32).cuda()
    f = torch.compile(lambda x: locdiff.spherical_harmonics(x, 12, validate=False), fullgraph=True)
    assert_close(f(xyz), locdiff.spherical_harmonics(xyz, 12))


# ---- Triton on the GPU vs CUDA -----------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [0, 1, 3, 8, 12, 33, 100, 300, 1000])
def test_triton_matches_cuda(degree, dtype):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton interpreter active")
    from locdiff.ops.triton import spherical_harmonics_triton, spherical_harmonics_triton_backward_op

    xyz = _points(_n_for(degree) * 4, dtype).cuda()
    assert_close(spherical_harmonics_triton(xyz, degree), spherical_harmonics_op(xyz, degree))
    g = torch.randn(xyz.shape[0], (degree + 1) ** 2, dtype=dtype, device="cuda")
    _rel_close(spherical_harmonics_triton_backward_op(xyz, g, degree),
               spherical_harmonics_backward_op(xyz, g, degree), dtype)
