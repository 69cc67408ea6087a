"""The op table (locdiff.ops.registry), walked row by row: every op has a CPU and a CUDA row;
every row available here gives the CPU kernel's result on the same inputs; torch ops pass
torch.library.opcheck; differentiable ones pass a float64 gradcheck; and compiled
(torch.compile, fullgraph) they match eager. CUDA rows run where a GPU is (a missing kernel
fails there), Triton rows on a GPU and, on the CPU, in the TRITON_INTERPRET=1 subprocess."""
from __future__ import annotations

import pytest
import torch

from locdiff import _C, grids, shdd
from locdiff.geo import latlon_to_xyz
from locdiff.ops import registry
from locdiff.testing import assert_close
from shdd_helpers import ring_args
from triton_interpreter import INTERPRETED, run_interpreted

L = 6
GRID = grids.equiangular(9, 16)


def _latlon_points(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64)


def samples(op: str, device: str):
    """(args, grad_args): inputs of op on device, and the indices of the differentiable ones."""
    g = torch.Generator().manual_seed(len(op))
    K = (L + 1) ** 2
    c = torch.randn(3, K, generator=g, dtype=torch.float64)
    points = torch.tensor([[10.0, 20.0], [-30.0, 100.0], [80.0, -5.0]], dtype=torch.float64)
    t = shdd.encode(points, L)
    ring = ring_args(GRID, L, device)
    xyz = _latlon_points(5, 1)
    row = torch.tensor([0, 1, 2, 0, 1])
    to = lambda *ts: tuple(x.to(device) for x in ts)  # noqa: E731
    if op == "spherical_harmonics":
        return (*to(xyz), L), (0,)
    if op == "spherical_harmonics_backward":
        return (*to(xyz, torch.randn(5, K, generator=g, dtype=torch.float64)), L), (0, 1)
    if op == "spherical_harmonics_out":
        return (*to(xyz), L, torch.empty(5, K, dtype=torch.float64, device=device)), ()
    if op in ("shdd_synth", "shdd_logz"):
        return (*to(c), *ring, *((0.7,) if op == "shdd_logz" else ())), (0,)
    if op == "shdd_adjoint":
        return (*to(torch.randn(3, GRID.size, generator=g, dtype=torch.float64)), *ring), (0,)
    if op == "shdd_kl":
        return (*to(c, t), *ring, 0.7), (0, 1)
    if op == "shdd_kl_backward":
        return (*to(c, t, torch.rand(3, generator=g, dtype=torch.float64)), *ring, 0.7, True, True), ()
    if op == "shdd_kl_grad":
        return (*to(c, t), *ring, 0.7, True, True), ()
    if op == "shdd_candidates":
        return (*to(t.float()), *ring, 4), ()
    if op in ("shdd_eval", "shdd_hessian"):
        return (*to(c, xyz, row), L), ()
    if op == "shdd_refine":  # starts near each vector's maximum: one basin for every route
        near = latlon_to_xyz(points) + 0.05 * torch.randn(3, 3, generator=g, dtype=torch.float64)
        return (*to(t, near, row[:3]), L, grids.half_max_radius(L), 40), ()
    if op == "shdd_decode_refine":
        _, value, start = registry.pick("shdd_candidates", "cpu")(t.float(), *ring_args(GRID, L, "cpu"), 6)
        return (*to(t, value, start), L, grids.half_max_radius(L), 2, 40), ()
    if op == "shdd_decode":
        return (*to(t), *ring, 6, grids.half_max_radius(L), 2, 40), ()
    raise AssertionError(f"no sample inputs for {op}: add them here")


def available(row: registry.Row) -> str | None:
    if row.device == "cuda" and not (torch.cuda.is_available() and _C.has_cuda()):
        return "needs a GPU and a CUDA build"
    if row.backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "needs triton"
        if row.device == "cpu" and not INTERPRETED:
            return "runs in the TRITON_INTERPRET=1 subprocess"
    elif INTERPRETED:
        return "native rows run in the parent process"
    return None


ROWS = [pytest.param(r, id=f"{r.op}-{r.device}-{r.backend}") for r in registry.TABLE]


def test_every_op_has_cpu_and_cuda_rows_with_sample_inputs():
    for op in registry.OPS:
        for device in registry.DEVICES:
            registry.row(op, device)  # raises when undeclared
        samples(op, "cpu")
    with pytest.raises(NotImplementedError, match="no triton implementation of shdd_synth on cuda"):
        registry.pick("shdd_synth", "cuda", "triton")


def test_rows_resolve_to_ops_of_their_kind():
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:  # the test extra has triton only on Linux x86_64
        have_triton = False
    for r in registry.TABLE:
        if r.backend == "triton" and not have_triton:
            continue
        impl = r.load()
        is_op = isinstance(impl, torch._library.custom_ops.CustomOpDef)
        assert is_op == (r.kind in ("kernel", "triton")), r


def _compare(got, want, float32_grid=False):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want):
        if a.dtype == torch.int64:
            continue  # grid indices: compared through the values
        a = a.cpu()
        ok = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), ok)
        tol = 1e-5 if b.dtype == torch.float32 or float32_grid else 1e-8
        assert_close(a[ok].to(b.dtype), b[ok], rtol=tol, atol=tol)


def _result(impl, args):
    out = impl(*args)
    if args and isinstance(args[-1], torch.Tensor) and out is None:  # out= form
        return args[-1]
    return out


@pytest.mark.parametrize("row", ROWS)
def test_row(row):
    reason = available(row)
    if reason:
        pytest.skip(reason)
    impl = row.load()
    args, grad_args = samples(row.op, row.device)
    cpu_args, _ = samples(row.op, "cpu")
    want = _result(registry.pick(row.op, "cpu"), cpu_args)
    got = _result(impl, args)
    if row.op == "shdd_candidates" and row.kind != "kernel":
        got = got[:2]  # starts: grid points here, the C++ scan's sub-cell step there
        want = want[:2]
    _compare(got, want, float32_grid=row.op == "shdd_candidates")
    # The Triton interpreter runs kernels on real memory: fake tensors (opcheck) and
    # torch.compile need a GPU for the Triton rows.
    traceable = row.kind in ("kernel", "triton") and not (row.backend == "triton" and row.device == "cpu")
    if traceable:
        torch.library.opcheck(impl, args)
    if row.differentiable and grad_args:
        leaves = [a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for i, a in enumerate(args)]

        def fn(*xs):
            full = list(leaves)
            for i, x in zip(grad_args, xs):
                full[i] = x
            return impl(*full)

        assert torch.autograd.gradcheck(fn, tuple(leaves[i] for i in grad_args), atol=1e-7)
    if traceable:
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: _result(impl, a), fullgraph=True, backend="aot_eager")
        _compare(compiled(*args), got)


def test_interpreted_triton_rows():
    """The CPU Triton rows, in a subprocess with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    run_interpreted(__file__)
