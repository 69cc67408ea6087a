"""Which device and backend implements each op: the one table the library layer's calls go
through (``pick``), and that tests/test_op_table.py walks.

A row is (op, device, backend) -> kind and implementation:
  kernel  a torch custom op over compiled kernels (csrc/cpu, csrc/cuda)
  triton  a torch.library.triton_op (CUDA; CPU under TRITON_INTERPRET=1, for tests)
  torch   composed of torch ops and the kernels the device has (locdiff.ops.shdd_torch)
Every row of one op has the op's signature, so rows are interchangeable and comparable.
Backends are the public ``backend`` argument: "native" (None) or "triton". The map with
reasons: docs/kernels.md, "Dispatch map".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

DEVICES = ("cpu", "cuda")
BACKENDS = ("native", "triton")


# Module accessors: import statements (not importlib), so that torch.compile traces a pick,
# and Triton is imported only when a Triton row is used.
def _sh():
    from locdiff.ops import sh
    return sh


def _shdd():
    from locdiff.ops import shdd
    return shdd


def _torch():
    from locdiff.ops import shdd_torch
    return shdd_torch


def _sh_triton():
    from locdiff.ops.triton import sh_triton
    return sh_triton


def _shdd_triton():
    from locdiff.ops.triton import shdd_triton
    return shdd_triton


def _refine_triton():
    from locdiff.ops.triton import refine
    return refine


@dataclass(frozen=True)
class Row:
    op: str
    device: str
    backend: str
    kind: str  # "kernel", "triton" or "torch"
    module: Callable  # the accessor of the implementation's module
    attr: str
    differentiable: bool = False

    def load(self) -> Callable:
        return getattr(self.module(), self.attr)


def _both(op: str, module: Callable, attr: str, differentiable: bool = False) -> list[Row]:
    return [Row(op, d, "native", "kernel", module, attr, differentiable) for d in DEVICES]


def _triton(op: str, module: Callable, attr: str, differentiable: bool = False) -> list[Row]:
    return [Row(op, d, "triton", "triton", module, attr, differentiable) for d in DEVICES]


def _cpu_kernel_cuda_torch(op: str, kernel: str, route: str, differentiable: bool = False) -> list[Row]:
    return [Row(op, "cpu", "native", "kernel", _shdd, kernel, differentiable),
            Row(op, "cuda", "native", "torch", _torch, route, differentiable)]


TABLE: tuple[Row, ...] = tuple(
    _both("spherical_harmonics", _sh, "spherical_harmonics_op", differentiable=True)
    + _triton("spherical_harmonics", _sh_triton, "spherical_harmonics_triton_op", differentiable=True)
    + _both("spherical_harmonics_backward", _sh, "spherical_harmonics_backward_op", differentiable=True)
    + _triton("spherical_harmonics_backward", _sh_triton, "spherical_harmonics_triton_backward_op",
              differentiable=True)
    + _both("spherical_harmonics_out", _sh, "spherical_harmonics_out_op")
    + _both("shdd_synth", _shdd, "shdd_synth_op", differentiable=True)
    + _both("shdd_adjoint", _shdd, "shdd_adjoint_op", differentiable=True)
    + _both("shdd_kl", _shdd, "shdd_kl_op", differentiable=True)
    + _both("shdd_kl_backward", _shdd, "shdd_kl_backward_op")
    + _both("shdd_kl_grad", _shdd, "shdd_kl_grad_op", differentiable=True)
    + _cpu_kernel_cuda_torch("shdd_logz", "shdd_logz_op", "logz", differentiable=True)
    + _cpu_kernel_cuda_torch("shdd_candidates", "shdd_candidates_op", "candidates")
    + _triton("shdd_candidates", _shdd_triton, "shdd_candidates_triton_op")
    + _cpu_kernel_cuda_torch("shdd_eval", "shdd_eval_op", "evaluate")
    + _triton("shdd_eval", _sh_triton, "shdd_eval_triton_op")
    + _cpu_kernel_cuda_torch("shdd_hessian", "shdd_hessian_op", "hessian")
    + _cpu_kernel_cuda_torch("shdd_refine", "shdd_refine_op", "refine")
    + _triton("shdd_refine", _refine_triton, "shdd_refine_triton_op")
    + _cpu_kernel_cuda_torch("shdd_decode_refine", "shdd_decode_refine_op", "decode_refine_native")
    + [Row("shdd_decode_refine", d, "triton", "torch", _torch, "decode_refine_triton") for d in DEVICES]
    + _cpu_kernel_cuda_torch("shdd_decode", "shdd_decode_op", "decode_native")
    + [Row("shdd_decode", d, "triton", "torch", _torch, "decode_triton") for d in DEVICES]
)

_INDEX = {(r.op, r.device, r.backend): r for r in TABLE}
_TRUE = ("1", "true", "on", "yes")
OPS = tuple(dict.fromkeys(r.op for r in TABLE))


def row(op: str, device: str, backend: str | None = None) -> Row:
    """The row for op on a device type ("cpu", "cuda") and backend (None: "native")."""
    backend = backend or "native"
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "").lower() not in _TRUE:
        # Triton compiles for GPUs; on the CPU its own error ("0 active drivers") names nothing.
        raise ValueError(f"backend 'triton' runs {op} on CUDA tensors, got a cpu tensor; on the CPU use "
                         f"backend None (the native kernels), or Triton's interpreter with TRITON_INTERPRET=1")
    hit = _INDEX.get((op, device, backend))
    if hit is None:
        have = sorted(f"{d}/{b}" for (o, d, b) in _INDEX if o == op)
        raise NotImplementedError(f"locdiff has no {backend} implementation of {op} on {device}; "
                                  f"it has {', '.join(have) or 'none'} (docs/kernels.md, 'Dispatch map')")
    return hit


def pick(op: str, device: str, backend: str | None = None) -> Callable:
    """The implementation of op on a device type and backend."""
    return row(op, device, backend).load()
