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


def _build(kernel, signature: dict, constants: dict, num_warps: int) -> dict:
    """PTX for sm_90, then ptxas: -> {"registers": n, "spill_bytes": n}."""
    src = ASTSource(kernel, {**signature, **{k: "constexpr" for k in constants}}, constexprs=constants)
    # FP fusion as launches get it today (Triton 3.9 warns that its default will change).
    compiled = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "enable_fp_fusion": True})
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


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_sh_kernels_build_for_hopper(dtype):
    from locdiff.ops.triton.sh_triton import _blocks, _sh_bwd_kernel, _sh_fwd_kernel

    block_p, block_m = _blocks(64)
    consts = {"BLOCK_P": block_p, "BLOCK_M": block_m}
    fwd = _build(_sh_fwd_kernel, {"xyz_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n": "i32", "L": "i32"}, consts, 4)
    bwd_sig = {"xyz_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "gxyz_ptr": f"*{dtype}", "n": "i32", "L": "i32"}
    bwd = _build(_sh_bwd_kernel, bwd_sig, consts, 4)
    assert fwd["registers"] > 0 and bwd["registers"] > 0


def test_decode_point_kernels_build_for_hopper():
    # f and its gradient at points, and the whole Newton refinement, float64.
    from locdiff.ops.triton.refine_triton import _refine_kernel
    from locdiff.ops.triton.sh_triton import _blocks, _dot_gradient_kernel

    block_p, block_m = _blocks(64)
    consts = {"BLOCK_P": block_p, "BLOCK_M": block_m}
    _build(_dot_gradient_kernel, {"xyz_ptr": "*fp64", "coeffs_ptr": "*fp64", "row_ptr": "*i64", "f_ptr": "*fp64",
                                  "gxyz_ptr": "*fp64", "n": "i32", "L": "i32"}, consts, 4)
    info = _build(_refine_kernel, {"coeffs_ptr": "*fp64", "row_ptr": "*i64", "xyz_ptr": "*fp64",
                                   "fscale_ptr": "*fp64", "out_xyz_ptr": "*fp64", "out_f_ptr": "*fp64",
                                   "n": "i32", "L": "i32", "radius": "fp64", "max_iter": "i32"}, consts, 4)
    assert info["registers"] > 0


@pytest.mark.parametrize("nlon", [256, 1024])  # L = 64 and 256 (grids.for_degree)
def test_ring_scan_kernel_builds_for_hopper_without_spills(nlon):
    from locdiff.ops.triton.shdd_triton import _num_warps, _ring_scan_kernel

    signature = {"coeffs_ptr": "*fp32", "table_ptr": "*fp64", "phase_ptr": "*fp32", "scratch_ptr": "*fp32",
                 "keys_ptr": "*i64", "n_items": "i32", "n_bands": "i32", "L": "i32", "nlat": "i32",
                 "nlon": "i32", "nhalf": "i32"}
    consts = {"BAND": 6, "ROWS": 8, "NLON": nlon, "BLOCK_I": 32, "C": 32, "C_RING": 32, "ANCHOR": 16}
    info = _build(_ring_scan_kernel, signature, consts, _num_warps(nlon))
    assert info["spill_bytes"] == 0, info
