"""Triton spherical harmonics (locdiff.ops.triton) on the CPU, under TRITON_INTERPRET=1.

The interpreted tests run in a subprocess that sets TRITON_INTERPRET=1
(test_interpreter_suite, see triton_interpreter.py); in this process they are skipped.
Small sizes only: the interpreter runs each program in numpy.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import locdiff  # noqa: E402
from locdiff.ops import (  # noqa: E402
    spherical_harmonics_backward_op,
    spherical_harmonics_op,
    spherical_harmonics_reference,
)
from locdiff.testing import TOLERANCES, assert_close  # noqa: E402
from triton_interpreter import needs_interpreter, run_interpreted  # noqa: E402


HARD_POINTS = [
    [0.0, 0.0, 1.0],            # north pole
    [0.0, 0.0, -1.0],           # south pole
    [1e-9, -2e-9, 1.0],         # near the pole (Reinsch's form)
    [3e-160, 1e-170, -1.0],     # seeds of m >= 3 underflow: scaled columns
    [1e-30, 0.0, 1.0],          # seeds of m >= 11 underflow
    [-1.0, 1e-17, 0.2],         # antimeridian, both sides
    [-1.0, -1e-17, -0.2],
    [0.0, 1.0, 0.0],            # equator
    [3e5, -2e5, 7e5],           # not unit length
    [0.3, 0.2, 0.5],            # |z| just around 1/2 after normalisation
]


def _points(dtype, n_random=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, 3, generator=g, dtype=torch.float64)
    return torch.cat([torch.tensor(HARD_POINTS, dtype=torch.float64), rand]).to(dtype)


def test_interpreter_suite():
    """Runs this file's tests in a subprocess with TRITON_INTERPRET=1."""
    run_interpreted(__file__)


def test_locdiff_import_does_not_import_triton():
    code = "import sys, locdiff, locdiff.ops; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_missing_triton_raises_clear_import_error():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "try:\n"
        "    import locdiff.ops.triton\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e), str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- interpreted tests ------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [0, 1, 2, 3, 5, 8, 12])
def test_forward_matches_cpu_and_reference(degree, dtype):
    from locdiff.ops.triton import spherical_harmonics_triton

    xyz = _points(dtype)
    out = spherical_harmonics_triton(xyz, degree)
    assert out.shape == (xyz.shape[0], (degree + 1) ** 2) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close(out, spherical_harmonics_op(xyz, degree))
    # The reference normalises in the input dtype; compare it in float64.
    ref = spherical_harmonics_reference(xyz.double(), degree).to(dtype)
    assert_close(out, ref)


@needs_interpreter
def test_several_column_passes(monkeypatch):
    # Orders split over several programs (forward) / passes (backward), as at high degree.
    from locdiff.ops.triton import sh_triton

    monkeypatch.setattr(sh_triton, "_MAX_BLOCK_M", 4)
    xyz = _points(torch.float64)
    degree = 13
    out = sh_triton.spherical_harmonics_triton(xyz, degree)
    assert_close(out, spherical_harmonics_op(xyz, degree))
    g = torch.randn_like(out)
    grad = sh_triton.spherical_harmonics_triton_backward_op(xyz, g, degree)
    assert_close(grad, spherical_harmonics_backward_op(xyz, g, degree))


@needs_interpreter
def test_public_backend_with_out_buffer():
    xyz = _points(torch.float32)
    out = torch.full((xyz.shape[0], 36), float("nan"))
    assert locdiff.spherical_harmonics(xyz, 5, backend="triton", out=out) is out
    assert_close(out, spherical_harmonics_op(xyz, 5))


@needs_interpreter
def test_degree_20_float64():
    from locdiff.ops.triton import spherical_harmonics_triton

    xyz = _points(torch.float64, n_random=2)
    assert_close(spherical_harmonics_triton(xyz, 20), spherical_harmonics_op(xyz, 20))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("degree", [0, 1, 4, 9, 12])
def test_backward_matches_cpu(degree, dtype):
    from locdiff.ops.triton import spherical_harmonics_triton_backward_op

    xyz = _points(dtype)
    g = torch.randn(xyz.shape[0], (degree + 1) ** 2, dtype=dtype)
    got = spherical_harmonics_triton_backward_op(xyz, g, degree)
    want = spherical_harmonics_backward_op(xyz, g, degree)
    assert torch.isfinite(got).all()
    # Gradients are sums of many terms: compare relative to their scale.
    scale = want.abs().max().clamp_min(1.0)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got / scale, want / scale, rtol=tol["rtol"], atol=tol["atol"] * 10)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_public_api_autograd(dtype):
    base = _points(dtype).reshape(2, -1, 3)  # leading batch dims go through the wrapper
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    y1 = locdiff.spherical_harmonics(x1, 6, backend="triton")
    y2 = locdiff.spherical_harmonics(x2, 6)
    assert_close(y1.detach(), y2.detach())
    w = torch.randn_like(y2)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    scale = x2.grad.abs().max().clamp_min(1.0)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(x1.grad / scale, x2.grad / scale, rtol=tol["rtol"], atol=tol["atol"] * 10)


@needs_interpreter
def test_gradcheck_float64():
    from locdiff.ops.triton import spherical_harmonics_triton

    xyz = torch.tensor([[0.3, -0.4, 0.8], [0.0, 0.0, 1.0], [-1.0, 1e-17, 0.2]],
                       dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: spherical_harmonics_triton(x, 3), (xyz,))


@needs_interpreter
def test_empty_batch_and_numpy():
    from locdiff.ops.triton import spherical_harmonics_triton

    out = spherical_harmonics_triton(torch.empty(0, 3, dtype=torch.float32), 4)
    assert out.shape == (0, 25)
    arr = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    got = locdiff.spherical_harmonics(arr, 3, backend="triton")
    np.testing.assert_allclose(got, locdiff.spherical_harmonics(arr, 3), rtol=1e-12, atol=1e-14)


@needs_interpreter
def test_rejects_bad_input():
    from locdiff.ops.triton import spherical_harmonics_triton

    with pytest.raises(ValueError, match="contiguous"):
        spherical_harmonics_triton(torch.randn(3, 4).t(), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        spherical_harmonics_triton(torch.randn(3, 3).half(), 2)
