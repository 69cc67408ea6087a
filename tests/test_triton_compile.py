"""The Triton kernels compile for a Hopper GPU (sm_90) ahead of time, on a machine without
one: Triton lowers them to PTX and its bundled ptxas assembles that, so type errors, ops the
GPU backend lacks and register spills show here rather than first on a lent GPU. (The
interpreter tests check what the kernels compute; this checks that they build.)"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
try:  # Triton's ahead-of-time API (3.x)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover - other Triton versions
    pytest.skip(f"this Triton has no ahead-of-time compile API ({exc})", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)


def _ptxas():
    # The ptxas Triton itself runs for sm_90 (whose version set the PTX version it wrote):
    # Triton 3.9 picks its newer "ptxas-blackwell" there, 3.8 the plain one.
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(HOPPER.arch).path
    except (ImportError, AttributeError, RuntimeError):
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not path or not os.path.exists(path):
        pytest.skip("no ptxas for Triton's NVIDIA backend")
    return path


def _compile(kernel, signature: dict, constants: dict, num_warps: int):
    src = ASTSource(kernel, {**signature, **{k: "constexpr" for k in constants}}, constexprs=constants)
    # FP fusion as launches get it today (Triton 3.9 warns that its default will change).
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "enable_fp_fusion": True})


def _assemble(compiled) -> dict:
    """ptxas on the PTX for sm_90: -> {"registers": n, "spill_bytes": n}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1)) if spill else 0}


def _launch_signature(kernel, launch, monkeypatch) -> tuple[dict, dict]:
    """Runs ``launch()`` with the kernel's run replaced by a recorder, and returns the
    signature Triton infers from the arguments the wrapper really passes (a Python float is
    fp32 there, whatever the interpreter does with it), the constexprs and num_warps."""
    from triton.runtime.jit import mangle_type

    calls = []
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    launch()
    assert calls, "the wrapper launched nothing"
    args, kwargs = calls[0]
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    constexprs = {names[i]: values[names[i]] for i in kernel.constexprs}
    signature = {n: mangle_type(v) for n, v in values.items() if n not in constexprs}
    constexprs["num_warps"] = kwargs.get("num_warps", 4)  # a launch option: popped by the caller
    return signature, constexprs


def _float32_in_ir(compiled) -> list[str]:
    return [line.strip() for line in compiled.asm["ttir"].splitlines() if "f32" in line]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sh_kernels_build_for_hopper(dtype, monkeypatch):
    # With the arguments the op passes; float64 kernels hold no float32 value anywhere (a
    # bare literal returned from a jit helper, or a Python float argument, would be one).
    from locdiff.ops.triton.sh_triton import _sh_bwd_kernel, _sh_fwd_kernel, spherical_harmonics_triton_op

    xyz = torch.randn(5, 3, dtype=dtype)
    grad = torch.randn(5, 65 * 65, dtype=dtype)
    for kernel, call in ((_sh_fwd_kernel, lambda: spherical_harmonics_triton_op(xyz, 64)),
                         (_sh_bwd_kernel, lambda: torch.ops.locdiff.spherical_harmonics_triton_backward(xyz, grad, 64))):
        signature, consts = _launch_signature(kernel, call, monkeypatch)
        compiled = _compile(kernel, signature, consts, consts.pop("num_warps"))
        info = _assemble(compiled)
        assert info["registers"] > 0
        if dtype == torch.float64:
            assert not _float32_in_ir(compiled), _float32_in_ir(compiled)[:5]


def test_decode_point_kernels_build_for_hopper(monkeypatch):
    # f and its gradient at points, and the whole Newton refinement, float64 throughout: the
    # radius reaches the kernel as float64 (a Python float argument would be fp32).
    from locdiff.ops.triton.refine import _refine_kernel, refine_triton
    from locdiff.ops.triton.sh_triton import _dot_gradient_kernel, sh_dot_and_gradient_triton

    c = torch.randn(2, 65 * 65, dtype=torch.float64)
    xyz = torch.randn(4, 3, dtype=torch.float64)
    row = torch.tensor([0, 1, 0, 1])
    for kernel, call in ((_dot_gradient_kernel, lambda: sh_dot_and_gradient_triton(c, xyz, row, 64)),
                         (_refine_kernel, lambda: refine_triton(c, 64, row, xyz, 0.034))):
        signature, consts = _launch_signature(kernel, call, monkeypatch)
        compiled = _compile(kernel, signature, consts, consts.pop("num_warps"))
        assert _assemble(compiled)["registers"] > 0
        assert not _float32_in_ir(compiled), _float32_in_ir(compiled)[:5]


@pytest.mark.parametrize("degree", [64, 256])  # nlon 256 and 1024 (grids.for_degree)
def test_ring_scan_kernel_builds_for_hopper_without_spills(degree, monkeypatch):
    from locdiff import grids
    from locdiff.ops.triton.shdd_triton import _ring_scan_kernel, ring_candidates_triton

    grid = grids.for_degree(degree)
    c = torch.randn(2, (degree + 1) ** 2)
    table = grid.legendre_table(degree)
    signature, consts = _launch_signature(
        _ring_scan_kernel, lambda: ring_candidates_triton(c, table, degree, grid.nlat, grid.nlon, grid.lon0, 32),
        monkeypatch)
    info = _assemble(_compile(_ring_scan_kernel, signature, consts, consts.pop("num_warps", 4)))
    assert info["spill_bytes"] == 0, info
