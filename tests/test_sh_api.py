"""Behaviour of the public spherical-harmonics API: shapes, dtypes, numpy, autograd,
torch.library checks, torch.compile, and every bad input we know of."""
import sys

import numpy as np
import pytest
import torch

import locdiff
from locdiff import shdd
from locdiff.ops import spherical_harmonics_op, spherical_harmonics_out_op, spherical_harmonics_reference
from locdiff.ops.sh import forward_cpu_numpy
from locdiff.testing import assert_close

pytestmark = pytest.mark.usefixtures("at_most_two_threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [0, 1, 3, 12])
def test_matches_reference(dtype, degree, rng):
    xyz = torch.tensor(rng.normal(size=(40, 3)), dtype=dtype)
    xyz[0] = torch.tensor([0.0, 0.0, 1.0])
    xyz[1] = torch.tensor([-1.0, 0.0, 0.0])  # antimeridian
    assert_close(locdiff.spherical_harmonics(xyz, degree), spherical_harmonics_reference(xyz, degree))


@pytest.mark.parametrize("dtype,degree", [(torch.float64, 4), (torch.float64, 16), (torch.float64, 20),
                                          (torch.float32, 5), (torch.float32, 8), (torch.float32, 20)])
def test_large_outputs_streamed_out_match(dtype, degree, rng):
    # Outputs of 4 MB and more leave through non-temporal stores at 4 <= L <= 20 in float64
    # (to 16 without AVX2) and L = 5, 8 <= L <= 20 in float32 (sh_cpu_small.cpp): the
    # same values as the direct stores of a small call, with a partial last block, and
    # against the reference on a sample; also into buffers 8 and 16 bytes off the 32-byte
    # alignment of the 32-byte streaming stores (16: the 16-byte ones; 8: no streaming).
    n = (4 << 20) // (dtype.itemsize * (degree + 1) ** 2) + 13
    xyz = torch.tensor(rng.normal(size=(n, 3)), dtype=dtype)
    big = locdiff.spherical_harmonics(xyz, degree)
    small = torch.cat([locdiff.spherical_harmonics(xyz[i:i + 1000], degree) for i in range(0, n, 1000)])
    assert torch.equal(big, small)
    K = (degree + 1) ** 2
    for offset_bytes in (8, 16):
        skip = offset_bytes // dtype.itemsize
        buffer = torch.full((n * K + skip,), float("nan"), dtype=dtype)[skip:].view(n, K)
        assert buffer.data_ptr() % 32 == offset_bytes
        locdiff.spherical_harmonics(xyz, degree, out=buffer)
        assert torch.equal(buffer, big)
    rows = torch.cat([torch.arange(16), torch.arange(n - 16, n)])
    xyz = xyz.double()
    assert_close(big[rows].double(), spherical_harmonics_reference(xyz[rows], degree),
                 atol=1e-12 if dtype == torch.float64 else 2e-6, rtol=0)


@pytest.mark.parametrize("dtype,degree", [(torch.float64, 21), (torch.float64, 130), (torch.float32, 25),
                                          (torch.float32, 64)])
def test_large_mid_degree_outputs_streamed_out_match(dtype, degree, rng):
    # From a quarter of the L3 in float64 and half in float32 (_C.sh_cpu_lanes_stream_bytes),
    # the lane kernel's rows go through a stage and leave by whole cache lines of
    # non-temporal stores, each row's first and last partial lines by ordinary ones
    # (sh_cpu_lanes.cpp forward_block_streamed): the same bits as calls below that size
    # (whole blocks of eight), into buffers at other offsets from a cache line, with a
    # partial last block, and near-polar points (float64 from L = 128 computes them again per
    # point, after the streamed stores).
    from locdiff import _C

    K = (degree + 1) ** 2
    threshold = _C.sh_cpu_lanes_stream_bytes(str(dtype).removeprefix("torch."))
    n = threshold // (dtype.itemsize * K) + 13
    xyz = torch.tensor(rng.normal(size=(n, 3)), dtype=dtype)
    xyz[:50, :2] *= 1e-3
    big = locdiff.spherical_harmonics(xyz, degree)
    chunk = max(16, threshold // (2 * dtype.itemsize * K) // 8 * 8)  # under the threshold
    small = torch.cat([locdiff.spherical_harmonics(xyz[i:i + chunk], degree) for i in range(0, n, chunk)])
    assert torch.equal(big, small)
    for skip in (1, 3) if dtype == torch.float64 else (1, 5):
        buffer = torch.full((n * K + skip,), float("nan"), dtype=dtype)[skip:].view(n, K)
        locdiff.spherical_harmonics(xyz, degree, out=buffer)
        assert torch.equal(buffer, big), skip
    rows = torch.cat([torch.arange(8), torch.arange(n - 8, n)])
    assert_close(big[rows].double(), spherical_harmonics_reference(xyz[rows].double(), degree),
                 atol=1e-11 if dtype == torch.float64 else 2e-6, rtol=0)


def test_shapes_numpy_and_normalisation(rng):
    p = rng.normal(size=(2, 5, 3))
    y = locdiff.spherical_harmonics(p, 4)
    assert isinstance(y, np.ndarray) and y.shape == (2, 5, 25) and y.dtype == np.float64
    np.testing.assert_allclose(locdiff.spherical_harmonics(7.5 * p, 4), y, atol=1e-15)
    y32 = locdiff.spherical_harmonics(p.astype(np.float32), 4)
    assert y32.dtype == np.float32
    assert locdiff.spherical_harmonics(p[0, 0], 2).shape == (9,)
    assert locdiff.spherical_harmonics(np.zeros((0, 3)), 3).shape == (0, 16)
    assert locdiff.spherical_harmonics(torch.zeros(4, 0, 3), 2).shape == (4, 0, 9)
    # non-contiguous input
    t = torch.tensor(rng.normal(size=(3, 8)))[:, 1:7:2]
    assert_close(locdiff.spherical_harmonics(t, 5), locdiff.spherical_harmonics(t.contiguous(), 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out_on_both_routes(dtype, rng, monkeypatch):
    # Small outputs run the kernel on the arrays' own memory (ops/sh.py forward_cpu_numpy),
    # large ones go through torch tensors and the output pool: the same values either way.
    direct = []
    monkeypatch.setattr(sys.modules["locdiff.ops.sh_api"], "forward_cpu_numpy",
                        lambda a, degree: direct.append(degree) or forward_cpu_numpy(a, degree))
    cases = [((2, 5, 3), 6), ((7, 3), 40), ((3,), 2), ((0, 3), 3), ((1, 3), 0), ((4, 3), 63), ((400, 3), 30), ((5, 3), 63)]
    for shape, degree in cases:
        p = rng.normal(size=shape).astype(dtype)
        want = locdiff.spherical_harmonics(torch.from_numpy(p), degree).numpy()
        got = locdiff.spherical_harmonics(p, degree)
        assert type(got) is np.ndarray and got.dtype == dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert direct == [6, 40, 2, 3, 0, 63]  # up to 2^14 values (the 4 x 4096 output), not above
    strided = rng.normal(size=(9, 8)).astype(dtype)[::2, 1:7:2]
    np.testing.assert_array_equal(locdiff.spherical_harmonics(strided, 5),
                                  locdiff.spherical_harmonics(torch.from_numpy(strided.copy()), 5).numpy())
    np.testing.assert_array_equal(locdiff.spherical_harmonics(strided, np.int64(5)),  # a numpy degree
                                  locdiff.spherical_harmonics(strided, 5))
    nested = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]  # a list is read as a float64 array
    np.testing.assert_array_equal(locdiff.spherical_harmonics(nested, 3),
                                  locdiff.spherical_harmonics(torch.tensor(nested, dtype=torch.float64), 3).numpy())


def test_half_precision_is_computed_in_float32():
    x = torch.tensor([[0.6, 0.0, 0.8]], dtype=torch.bfloat16)
    y = locdiff.spherical_harmonics(x, 3)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), locdiff.spherical_harmonics(x.float(), 3), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("n,degree", [(300, 30), (5, 4), (40, 4), (3, 30)])
def test_thread_count_does_not_change_results(n, degree, rng):
    # Small calls run on fewer threads than asked (sh_cpu.cpp threads_for): same values.
    xyz = torch.tensor(rng.normal(size=(n, 3)))
    grad = torch.tensor(rng.normal(size=(n, (degree + 1) ** 2)))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = xyz.clone().requires_grad_(True)
            y = locdiff.spherical_harmonics(x, degree)
            (g,) = torch.autograd.grad(y, x, grad)
            results.append((y.detach(), g))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_op_only_where_nothing_observes_it(rng):
    # Plain eager CPU calls go straight to the kernel (ops/sh.py can_skip_dispatch); modes,
    # autograd and the profiler must still see locdiff::spherical_harmonics.
    xyz = torch.tensor(rng.normal(size=(37, 3)))
    direct = locdiff.spherical_harmonics(xyz, 5)
    assert torch.equal(direct, spherical_harmonics_op(xyz, 5))
    np.testing.assert_array_equal(locdiff.spherical_harmonics(xyz.numpy(), 5), direct.numpy())

    recorder = _OpRecorder()
    with recorder:
        in_mode = locdiff.spherical_harmonics(xyz, 5)
    assert any("locdiff.spherical_harmonics" in op for op in recorder.ops), recorder.ops
    assert torch.equal(in_mode, direct)

    leaf = xyz.clone().requires_grad_(True)
    assert locdiff.spherical_harmonics(leaf, 5).grad_fn is not None
    with torch.no_grad():
        assert locdiff.spherical_harmonics(leaf, 5).grad_fn is None

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        locdiff.spherical_harmonics(xyz, 5)
        locdiff.spherical_harmonics(xyz.numpy(), 4)  # numpy in: the op too, not the direct route
    names = [e.key for e in prof.key_averages()]
    assert names.count("locdiff::spherical_harmonics") == 1, names
    assert [e.count for e in prof.key_averages() if e.key == "locdiff::spherical_harmonics"] == [2]

    # A leading batch shape and a float32 view of other strides take the reshaping path.
    batch = torch.tensor(rng.normal(size=(3, 4, 3)), dtype=torch.float32)
    assert torch.equal(locdiff.spherical_harmonics(batch, 5),
                       spherical_harmonics_op(batch.reshape(12, 3), 5).reshape(3, 4, 36))
    strided = torch.tensor(rng.normal(size=(3, 8)))[:, 2:5]
    assert torch.equal(locdiff.spherical_harmonics(strided, 5), spherical_harmonics_op(strided.contiguous(), 5))


def test_gradcheck_and_gradgradcheck():
    xyz = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0], [1e-7, 0.0, 1.0], [0.3, -0.4, 0.5], [-1.0, 1e-12, 0.1]],
                       dtype=torch.float64, requires_grad=True)
    for degree in [0, 1, 2, 7]:
        assert torch.autograd.gradcheck(lambda t: locdiff.spherical_harmonics(t, degree), (xyz,))
    for degree in [0, 4]:  # degree 0 is a constant: its second derivatives are 0, not an error
        assert torch.autograd.gradgradcheck(lambda t: locdiff.spherical_harmonics(t, degree), (xyz,))


# The CPU backward: small-degree lanes to L = 5, lanes degree by degree to 288, per point
# above (csrc/cpu/sh_cpu_small.h); 30 points end in a block of 6 (one full half, one of 2),
# and 3 (on two threads) take the per-point kernel at every degree from 6 (sh_cpu.cpp few_points).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [3, 5, 6, 30, 100, 288, 289])
@pytest.mark.parametrize("n", [30, 3])
def test_backward_matches_reference_autograd(n, degree, dtype, rng):
    xyz = torch.tensor(rng.normal(size=(n, 3)))
    xyz[0] = torch.tensor([0.0, 0.0, 1.0])
    xyz[1] = torch.tensor([1e-9, -2e-9, -1.0])
    a = xyz.clone().to(dtype).requires_grad_(True)
    b = xyz.clone().to(dtype).double().requires_grad_(True)
    g = torch.tensor(rng.normal(size=(n, (degree + 1) ** 2)))
    (locdiff.spherical_harmonics(a, degree) * g.to(dtype)).sum().backward()
    (spherical_harmonics_reference(b, degree) * g.to(dtype).double()).sum().backward()
    # the reference's plain recurrence loses about l^2 ulp near the poles; float32 rounds once
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    scale = b.grad.abs().max()
    assert_close(a.grad.double() / scale, b.grad / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("degree", [200, 300])
@pytest.mark.parametrize("point", [[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [2e-9, 1e-9, -1.0], [0.6, -0.8, 1e-3]])
def test_high_degree_gradient_is_finite_and_matches_finite_differences(point, degree):
    xyz = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    w = torch.randn((degree + 1) ** 2, dtype=torch.float64)
    (locdiff.spherical_harmonics(xyz, degree) @ w).backward()
    assert torch.isfinite(xyz.grad).all()
    h = 1e-7
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = h
        with torch.no_grad():
            f = lambda v: float(locdiff.spherical_harmonics(v, degree) @ w)  # noqa: E731
            fd = (f(xyz + e) - f(xyz - e)) / (2 * h)
        assert abs(fd - float(xyz.grad[j])) <= 1e-5 * (1 + abs(fd)), (j, fd, float(xyz.grad[j]))


def test_opcheck(rng):
    xyz = torch.tensor(rng.normal(size=(7, 3)), requires_grad=True)
    torch.library.opcheck(spherical_harmonics_op, (xyz, 5))
    torch.library.opcheck(spherical_harmonics_op, (xyz.detach().float(), 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [2, 12, 40])  # the small-degree, lanes and per-point kernels
def test_out_buffer_gets_the_same_values_and_is_returned(dtype, degree, rng):
    xyz = torch.tensor(rng.normal(size=(5, 9, 3)), dtype=dtype)
    want = locdiff.spherical_harmonics(xyz, degree)
    out = torch.full_like(want, float("nan"))
    assert locdiff.spherical_harmonics(xyz, degree, out=out) is out
    assert torch.equal(out, want)
    # Strided buffers (a copy behind the scenes), numpy in and out, reuse of one buffer.
    wide = torch.full((5, 9, 2 * want.shape[-1]), float("nan"), dtype=dtype)[..., ::2]
    assert locdiff.spherical_harmonics(xyz, degree, out=wide) is wide and torch.equal(wide, want)
    out_np = np.full(want.shape, np.nan, dtype=want.numpy().dtype)
    for _ in range(2):
        assert locdiff.spherical_harmonics(xyz.numpy(), degree, out=out_np) is out_np
        np.testing.assert_array_equal(out_np, want.numpy())
    empty = torch.empty((0, (degree + 1) ** 2), dtype=dtype)
    assert locdiff.spherical_harmonics(torch.empty((0, 3), dtype=dtype), degree, out=empty) is empty


def test_numpy_inputs_of_every_layout_and_byte_order(rng):
    x = rng.standard_normal((5, 3))
    want = locdiff.spherical_harmonics(x, 4)
    np.testing.assert_array_equal(locdiff.spherical_harmonics(x.astype(">f8"), 4), want)
    out = np.empty((16, 5)).T  # a transposed (non-contiguous) buffer takes the values as they are
    np.testing.assert_array_equal(locdiff.spherical_harmonics(x, 3, out=out), want[:, :16])
    with pytest.raises(TypeError, match="xyz must be a floating-point array .* got dtype float128"):
        locdiff.spherical_harmonics(x.astype(np.longdouble), 2)
    for scalar in (np.array(2.0), 2.0):
        with pytest.raises(ValueError, match=r"xyz must have shape \(\.\.\., 3\), got a scalar"):
            locdiff.spherical_harmonics(scalar, 2)


def test_out_buffer_bad_input():
    xyz = torch.randn(4, 3, dtype=torch.float64)
    cases = [
        (torch.empty(4, 15, dtype=torch.float64), ValueError, r"out must have shape \(4, 16\), got \(4, 15\)"),
        (torch.empty(4, 16, dtype=torch.float32), TypeError, "out must have xyz's dtype float64, got float32"),
        (np.empty((4, 16)), TypeError, "out must be a torch.Tensor"),
        (torch.empty(4, 16, dtype=torch.float64, requires_grad=True), ValueError, "not differentiable"),
        (torch.empty(1, 16, dtype=torch.float64).expand(4, 16), ValueError,
         r"out has elements that may share memory \(strides \(0, 1\)"),
    ]
    for out, error, match in cases:
        with pytest.raises(error, match=match):
            locdiff.spherical_harmonics(xyz, 3, out=out)
    with pytest.raises(ValueError, match="not differentiable"):
        locdiff.spherical_harmonics(xyz.clone().requires_grad_(True), 3, out=torch.empty(4, 16, dtype=torch.float64))
    buf = torch.randn(100, dtype=torch.float64)
    with pytest.raises(ValueError, match="out shares memory with xyz"):
        locdiff.spherical_harmonics(buf[:12].view(4, 3), 3, out=buf[36:100].view(4, 16))
    with pytest.raises(TypeError, match="out must have xyz's dtype float64, got float32$"):
        locdiff.spherical_harmonics(xyz.numpy(), 3, out=np.empty((4, 16), np.float32))  # numpy names, not torch's
    with pytest.raises(TypeError, match="out must be a numpy array when xyz is one"):
        locdiff.spherical_harmonics(xyz.numpy(), 3, out=torch.empty(4, 16, dtype=torch.float64))
    read_only = np.empty((4, 16))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be a writeable array"):
        locdiff.spherical_harmonics(xyz.numpy(), 3, out=read_only)
    with pytest.raises(ValueError, match="xyz row 1 is non-finite"):
        locdiff.spherical_harmonics(torch.tensor([[0.0, 0, 1], [np.nan, 0, 1]]), 3,
                                    out=torch.empty(2, 16, dtype=torch.float32))


def test_out_op_opcheck_and_compile(rng):
    xyz = torch.tensor(rng.normal(size=(7, 3)))
    torch.library.opcheck(spherical_harmonics_out_op, (xyz, 5, torch.empty(7, 36, dtype=torch.float64)))

    def f(t, buf):
        locdiff.spherical_harmonics(t, 4, validate=False, out=buf)
        return buf.sum(-1)

    buf_a, buf_b = torch.empty(7, 25, dtype=torch.float64), torch.empty(7, 25, dtype=torch.float64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(xyz, buf_a), f(xyz, buf_b))
    assert torch.equal(buf_a, buf_b)


def test_torch_compile_fullgraph_matches_eager(rng):
    xyz = torch.tensor(rng.normal(size=(16, 3)), requires_grad=True)

    def f(t):
        return (locdiff.spherical_harmonics(t, 6, validate=False) ** 2).sum(-1).sin()

    # aot_eager traces through the fake kernels and the registered autograd formulas.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(xyz), f(xyz))
    (ga,) = torch.autograd.grad(compiled(xyz).sum(), xyz)
    (gb,) = torch.autograd.grad(f(xyz).sum(), xyz)
    assert_close(ga, gb)


def test_module_encodes_latlon():
    enc = locdiff.SphericalHarmonics(8)
    latlon = torch.tensor([[48.85, 2.35], [-33.9, 151.2]], dtype=torch.float64)
    out = enc(latlon)
    assert out.shape == (2, 81) and enc.embedding_dim == 81
    assert_close(out, locdiff.spherical_harmonics(locdiff.latlon_to_xyz(latlon), 8))


@pytest.mark.parametrize(
    "xyz, degree, error, match",
    [
        (torch.tensor([[float("nan"), 0.0, 1.0]]), 3, ValueError, "non-finite"),
        (torch.tensor([[float("inf"), 0.0, 1.0]]), 3, ValueError, "non-finite"),
        (torch.zeros(2, 3), 3, ValueError, "zero vector"),
        (torch.ones(2, 4), 3, ValueError, r"shape \(\.\.\., 3\)"),
        (torch.ones(3), -1, ValueError, "degree"),
        (torch.ones(3), 2.5, ValueError, "degree"),
        (torch.ones(3), True, ValueError, "degree"),
        (torch.ones(3), 10**6, ValueError, "degree"),
        (torch.ones(3, dtype=torch.int64), 3, TypeError, "floating-point"),
        (np.ones(3, dtype=np.int32), 3, TypeError, "float32 or float64"),
        (np.array([[0.0, 0.0, 1.0], [np.nan, 0.0, 1.0]]), 3, ValueError, "row 1 is non-finite"),
        (np.zeros((2, 3), dtype=np.float32), 3, ValueError, "row 0 is a zero vector"),
        (np.ones((2, 4)), 3, ValueError, r"shape \(\.\.\., 3\)"),
        (np.ones(3), -1, ValueError, "degree"),
        (np.ones(3), 2.5, ValueError, "degree"),
        (torch.ones(10**6, 3), 4000, MemoryError, "GiB"),
        (torch.ones(2, 3, device="meta"), 3, NotImplementedError, "spherical_harmonics on meta; it has cpu"),
    ],
)
def test_bad_input(xyz, degree, error, match):
    with pytest.raises(error, match=match):
        locdiff.spherical_harmonics(xyz, degree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [2, 40, 600])
@pytest.mark.parametrize("bad", [[1.0, float("nan"), 0.0], [1.0, 1.0, float("nan")], [0.5, float("-inf"), 2.0],
                                 [float("nan"), 1.0, 1.0]])
def test_a_non_finite_component_anywhere_is_caught(bad, degree, dtype):
    # A NaN beside a finite, larger component once slipped past the kernel's row check
    # (std::max drops a NaN second argument) and came back as NaN rows.
    n, row = (3000, 1777) if degree < 100 else (20, 17)  # rows in the fast and careful blocks
    xyz = torch.randn(n, 3, generator=torch.Generator().manual_seed(degree), dtype=dtype)
    xyz[row] = torch.tensor(bad, dtype=dtype)
    with pytest.raises(ValueError, match=f"xyz row {row} is non-finite"):
        locdiff.spherical_harmonics(xyz, degree)
    with pytest.raises(ValueError, match="row 0 is non-finite"):
        locdiff.spherical_harmonics(xyz[row:row + 1].numpy(), degree)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        locdiff.spherical_harmonics(torch.ones(3), 2, backend="fortran")


def test_triton_backend_on_a_cpu_tensor_is_named(monkeypatch):
    # Triton's own error on a machine without a GPU ("0 active drivers") names nothing.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' runs spherical_harmonics on CUDA tensors, got a cpu"):
        locdiff.spherical_harmonics(torch.ones(3), 2, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' runs shdd_decode on CUDA tensors"):
        shdd.decode(shdd.encode(torch.tensor([10.0, 20.0]), 4), backend="triton")


def test_cuda_tensor_on_cpu_only_build_raises():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="built without CUDA|CUDA"):
            locdiff._C.sh_cuda(0, 1, 2, 0, 0, "float32") if not locdiff.has_cuda() else (_ for _ in ()).throw(
                RuntimeError("CUDA build"))
    elif not locdiff.has_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            locdiff.spherical_harmonics(torch.ones(2, 3, device="cuda"), 2)


def test_geo_round_trip_and_distances(rng):
    latlon = np.stack([rng.uniform(-90, 90, 100), rng.uniform(-180, 180, 100)], -1)
    back = locdiff.xyz_to_latlon(locdiff.latlon_to_xyz(latlon))
    np.testing.assert_allclose(back, latlon, atol=1e-9)
    d = locdiff.great_circle_km(np.array([0.0, 0.0]), np.array([[0.0, 180.0], [90.0, 0.0], [0.0, 1e-9]]))
    np.testing.assert_allclose(d, [np.pi * 6371.0088, np.pi / 2 * 6371.0088, 1e-9 * np.pi / 180 * 6371.0088],
                               rtol=1e-9)
    assert locdiff.latlon_to_xyz(np.array([0.0, 540.0]))[0] == pytest.approx(-1.0)  # lon wraps
    with pytest.raises(ValueError, match="latitude"):
        locdiff.latlon_to_xyz(np.array([91.0, 0.0]))
    with pytest.raises(ValueError, match="latitude"):
        locdiff.latlon_to_xyz(torch.tensor([float("nan"), 0.0]))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_jacobians_in_reverse_mode_and_forward_mode_refused(rng):
    # docs/conventions.md: the custom ops have no JVP, so forward mode would give a silent
    # zero derivative: it is refused.
    import torch.autograd.forward_ad as fwAD

    x = torch.from_numpy(rng.standard_normal(3))
    f = lambda v: locdiff.spherical_harmonics(v, 5)  # noqa: E731
    want = torch.autograd.functional.jacobian(lambda v: spherical_harmonics_reference(v[None], 5)[0], x)
    assert_close(torch.autograd.functional.jacobian(f, x), want)
    c = shdd.encode(torch.tensor([[10.0, 20.0]], dtype=torch.float64), 8)
    calls = [lambda: torch.func.jacfwd(f)(x), lambda: torch.func.jvp(shdd.density, (c,), (c,)),
             lambda: torch.func.jvp(lambda v: shdd.values_at(v, torch.zeros(2)), (c,), (c,))]
    for call in calls:
        with pytest.raises(NotImplementedError, match="forward-mode tangent .* reverse mode only"):
            call()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="xyz carries a forward-mode tangent"):
        f(fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("in_dims", [0, 1])
def test_vmap_maps_the_op_and_its_gradient_op_as_one_batch(in_dims, rng, monkeypatch):
    # The batching rules (ops/sh.py) give what a loop over the samples gives, in one kernel
    # call for all samples (torch's fallback would call the op once per sample).
    from locdiff.ops import launch, spherical_harmonics_backward_op
    from locdiff.ops import sh as ops_sh

    x = torch.from_numpy(rng.standard_normal((4, 5, 3)))
    g = torch.from_numpy(rng.standard_normal((x.shape[1 - in_dims], 36)))  # one sample's points
    looped = torch.stack([spherical_harmonics_op(s, 5) for s in x.unbind(in_dims)])
    grads = torch.stack([spherical_harmonics_backward_op(s, g, 5) for s in x.unbind(in_dims)])
    calls = []
    forward, run = ops_sh.forward_cpu, launch.run
    monkeypatch.setattr(ops_sh, "forward_cpu", lambda *a: calls.append("forward") or forward(*a))
    monkeypatch.setattr(launch, "run", lambda *a, **k: calls.append("backward") or run(*a, **k))
    assert_close(torch.func.vmap(lambda s: spherical_harmonics_op(s, 5), in_dims=in_dims)(x), looped)
    mapped = torch.func.vmap(lambda s: spherical_harmonics_backward_op(s, g, 5), in_dims=in_dims)(x)
    assert calls == ["forward", "backward"]
    assert_close(mapped, grads)
    assert_close(mapped, torch.stack([_reference_vjp(s, g, 5) for s in x.unbind(in_dims)]))


def _reference_vjp(xyz, g, degree):
    x = xyz.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(spherical_harmonics_reference(x, degree), x, g)
    return gx


def test_ops_read_strided_views_as_their_contiguous_copies(rng):
    # An op reached directly (torch.ops.locdiff, a torch.func fallback) may get a strided
    # view; the kernels read dense rows, so the ops make their inputs contiguous.
    from locdiff import grids
    from locdiff.ops import spherical_harmonics_backward_op
    from locdiff.shdd import _grid_args

    x = torch.from_numpy(rng.standard_normal((6, 4, 3)))[:, 1]  # (6, 3), row stride 12
    g = torch.from_numpy(rng.standard_normal((36, 6))).T          # (6, 36), column-major
    assert not x.is_contiguous() and not g.is_contiguous()
    assert_close(spherical_harmonics_op(x, 5), spherical_harmonics_op(x.contiguous(), 5))
    assert_close(torch.ops.locdiff.spherical_harmonics(x, 5), spherical_harmonics_op(x.contiguous(), 5))
    assert_close(spherical_harmonics_backward_op(x, g, 5),
                 spherical_harmonics_backward_op(x.contiguous(), g.contiguous(), 5))
    out = torch.empty(6, 36, dtype=torch.float64)
    spherical_harmonics_out_op(x, 5, out)
    assert_close(out, spherical_harmonics_op(x.contiguous(), 5))
    with pytest.raises(ValueError, match=r"grad_out must be \(6, 36\) torch.float64 for xyz \(6, 3\) at degree 5, "
                                         r"got \(6, 25\) torch.float64"):
        spherical_harmonics_backward_op(x, g[:, :25], 5)
    with pytest.raises(ValueError, match=r"got \(6, 36\) torch.float32"):
        spherical_harmonics_backward_op(x, g.float(), 5)
    with pytest.raises(ValueError, match=r"xyz must have shape \(N, 3\), got \(3,\)"):
        spherical_harmonics_op(x[0], 5)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(6, 36\) torch.float64 tensor, got \(6, 25\)"):
        spherical_harmonics_out_op(x, 5, torch.empty(6, 25, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        spherical_harmonics_out_op(x, 5, torch.empty(36, 6, dtype=torch.float64).T)

    c = shdd.encode(torch.tensor([[10.0, 20.0], [-45.0, 170.0], [89.0, 0.0]], dtype=torch.float64), 6)
    wide = torch.zeros(3, 2 * c.shape[1], dtype=torch.float64)
    wide[:, ::2] = c
    strided = wide[:, ::2]                                        # every other column
    assert not strided.is_contiguous()
    ring = _grid_args(grids.for_degree(6), 6, "cpu").ring
    ops = torch.ops.locdiff
    assert_close(ops.shdd_synth(strided, *ring), ops.shdd_synth(c, *ring))
    assert_close(ops.shdd_logz(strided, *ring, 2.0), ops.shdd_logz(c, *ring, 2.0))
    assert_close(ops.shdd_kl(strided, strided.flip(0), *ring, 2.0), ops.shdd_kl(c, c.flip(0), *ring, 2.0))
    pts, row = x / x.norm(dim=1, keepdim=True), torch.tensor([0, 1, 2, 0, 1, 2])
    for a, b in zip(ops.shdd_eval(strided, pts, row, 6), ops.shdd_eval(c, pts.contiguous(), row, 6)):
        assert_close(a, b)
    for a, b in zip(ops.shdd_decode(strided, *ring, 4, 0.1, 2, 40), ops.shdd_decode(c, *ring, 4, 0.1, 2, 40)):
        assert_close(a, b)


def test_torch_func_reverse_mode_transforms_match_the_reference(rng):
    # torch refuses its transforms on a custom op's own autograd; ops/sh_func.py routes
    # wrapped tensors through Functions it accepts (docs/conventions.md).
    x = torch.from_numpy(rng.standard_normal((5, 3)))
    xb = torch.from_numpy(rng.standard_normal((3, 5, 3)))
    ours = lambda p: locdiff.spherical_harmonics(p, 6)  # noqa: E731
    ref = lambda p: spherical_harmonics_reference(p, 6)  # noqa: E731
    loss = lambda f: (lambda p: f(p).square().sum())  # noqa: E731
    assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x))
    assert_close(torch.func.vmap(torch.func.grad(loss(ours)))(xb), torch.func.vmap(torch.func.grad(loss(ref)))(xb))
    assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x))
    value, pull = torch.func.vjp(ours, x)
    g = torch.ones_like(value)
    assert_close(pull(g)[0], torch.func.vjp(ref, x)[1](g)[0])
    one = lambda f: (lambda p: f(p).sum())  # noqa: E731
    assert_close(torch.func.jacrev(torch.func.jacrev(one(ours)))(x[0]),  # a Hessian in reverse mode
                 torch.func.jacrev(torch.func.jacrev(one(ref)))(x[0]))


def test_out_in_the_other_byte_order_is_filled(rng):
    xyz = rng.standard_normal((4, 3))
    out = np.empty((4, 9), ">f8")
    assert locdiff.spherical_harmonics(xyz, 2, out=out) is out
    np.testing.assert_array_equal(out, locdiff.spherical_harmonics(xyz, 2))
