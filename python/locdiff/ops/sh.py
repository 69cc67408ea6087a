"""``locdiff::spherical_harmonics``: the torch op over the compiled kernels.

Two ops, each with a fake kernel (shape only, for torch.compile) and per-device kernels:
  locdiff::spherical_harmonics(xyz (N,3), degree) -> (N, (degree+1)^2)
  locdiff::spherical_harmonics_backward(xyz, grad_out, degree) -> grad_xyz (N,3)
The backward op is itself differentiable (double backward), through the pure-torch
reference: slower, but exact, and only needed for second derivatives.
Inputs here are already validated (see locdiff.sh); the ops make them contiguous
(launch.contiguous_inputs). torch.func's transforms go through ops/sh_func.py.
"""
from __future__ import annotations

import numpy as np
import torch

from locdiff import _C
from locdiff.ops import launch, output_pool
from locdiff.ops.sh_reference import spherical_harmonics_reference
from locdiff.ops.validation import raise_bad_row

_dtype_tag = launch.dtype_tag


def _forward_cpu_into(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    if xyz.shape[0]:
        # The kernel checks rows as it normalises them (no separate pass over the input).
        bad = _C.sh_cpu(xyz.data_ptr(), xyz.shape[0], degree, out.data_ptr(), torch.get_num_threads(),
                        _dtype_tag(xyz))
        if bad >= 0:
            raise_bad_row(xyz, bad, "xyz")


def _forward_cuda_into(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    launch.one_device("spherical_harmonics", xyz=xyz, out=out)
    if xyz.shape[0]:
        launch.run("sh", xyz, xyz.data_ptr(), xyz.shape[0], degree, out.data_ptr())


def forward_cpu(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    """The CPU kernel into a new output (the op's CPU kernel, callable without the op)."""
    out = output_pool.empty((xyz.shape[0], (degree + 1) ** 2), xyz.dtype)
    _forward_cpu_into(xyz, degree, out)
    return out


def can_skip_dispatch(xyz: torch.Tensor) -> bool:
    """Whether a forward on ``xyz`` may call forward_cpu directly instead of the op.

    Why: the custom op's Python dispatch (autograd wrapper, redispatch, alias checks) costs
    more than the kernel itself below a few thousand points at low degree (docs/kernels.md,
    "Per-call costs"). Skipping it is only safe where nothing could observe the op: a plain CPU tensor
    in eager mode, no autograd graph to record, no torch.compile, jit tracing, functorch
    transform (vmap, grad) or torch function / dispatch mode (FakeTensorMode, profilers'
    op counters, a device context) active, and no profiler running (its traces name the op).
    Otherwise the op runs as before.
    """
    return (type(xyz) is torch.Tensor and xyz.is_cpu
            and not (xyz.requires_grad and torch.is_grad_enabled())
            and nothing_observes_ops()
            and not torch._C._functorch.is_functorch_wrapped_tensor(xyz))


def nothing_observes_ops() -> bool:
    """No torch.compile, torch function / dispatch mode, jit tracer or profiler is active."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_function_stack() == 0
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._get_tracing_state() is None
            and not torch.autograd._profiler_enabled())


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def forward_cpu_numpy(xyz: np.ndarray, degree: int) -> np.ndarray:
    """The CPU kernel on a C-contiguous float32/float64 (..., 3) array into a new numpy array.

    For small outputs (callers keep large ones on the torch route, whose output pool saves
    their page faults): wrapping small arrays as tensors and back costs a fifth of a call
    (docs/kernels.md, "Per-call costs"). Where something observes ops (a profiler, a mode),
    the call goes through the op instead, so that it is seen.
    """
    K = (degree + 1) ** 2
    if not nothing_observes_ops():
        flat = torch.from_numpy(xyz).reshape(-1, 3)
        return spherical_harmonics_op(flat, degree).reshape(*xyz.shape[:-1], K).numpy()
    out = np.empty((*xyz.shape[:-1], K), xyz.dtype)
    n = xyz.size // 3
    if n:
        tag = "float32" if xyz.dtype == np.float32 else "float64"
        bad = _C.sh_cpu(_address(xyz), n, degree, _address(out), torch.get_num_threads(), tag)
        if bad >= 0:
            raise_bad_row(torch.from_numpy(xyz), bad, "xyz")
    return out


def _check_points(op: str, xyz: torch.Tensor) -> None:
    # The kernels read N x 3 values of xyz's dtype (locdiff.sh checks before the public call;
    # an op reached directly is checked here).
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"locdiff::{op}: xyz must have shape (N, 3), got {tuple(xyz.shape)}")


@torch.library.custom_op("locdiff::spherical_harmonics", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def spherical_harmonics_op(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    _check_points("spherical_harmonics", xyz)
    return forward_cpu(xyz, degree)


@spherical_harmonics_op.register_kernel("cuda")
@launch.contiguous_inputs
def _(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    _check_points("spherical_harmonics", xyz)
    out = torch.empty((xyz.shape[0], (degree + 1) ** 2), dtype=xyz.dtype, device=xyz.device)
    _forward_cuda_into(xyz, degree, out)
    return out


@spherical_harmonics_op.register_fake
def _(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    return xyz.new_empty((xyz.shape[0], (degree + 1) ** 2))


# The out= form (locdiff.spherical_harmonics(..., out=buf)): writes into a caller's buffer of
# shape (N, (degree+1)^2), contiguous, xyz's dtype and device. Not differentiable (as torch's
# own out= variants). It exists for memory: a fresh output of tens of MB is new pages from
# the OS, and first-touch page faults can cost more than the harmonics (docs/kernels.md,
# "Output memory").
@torch.library.custom_op("locdiff::spherical_harmonics_out", mutates_args=("out",), device_types="cpu")
def spherical_harmonics_out_op(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    _check_out(xyz, degree, out)
    _forward_cpu_into(xyz.contiguous(), degree, out)


@spherical_harmonics_out_op.register_kernel("cuda")
def _(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    _check_out(xyz, degree, out)
    _forward_cuda_into(xyz.contiguous(), degree, out)


def _check_out(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    # The kernels write N x K dense rows of xyz's dtype; a copy would leave the caller's
    # buffer unwritten, so a strided one is refused.
    _check_points("spherical_harmonics_out", xyz)
    want = (xyz.shape[0], (degree + 1) ** 2)
    if tuple(out.shape) != want or out.dtype != xyz.dtype or not out.is_contiguous():
        raise ValueError(f"locdiff::spherical_harmonics_out: out must be a contiguous {want} {xyz.dtype} tensor, "
                         f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")


@spherical_harmonics_out_op.register_fake
def _(xyz: torch.Tensor, degree: int, out: torch.Tensor) -> None:
    return None


@torch.library.custom_op("locdiff::spherical_harmonics_backward", mutates_args=(), device_types=("cpu", "cuda"))
@launch.contiguous_inputs
def spherical_harmonics_backward_op(xyz: torch.Tensor, grad_out: torch.Tensor, degree: int) -> torch.Tensor:
    grad_xyz = torch.empty_like(xyz)
    launch.one_device("spherical_harmonics_backward", xyz=xyz, grad_out=grad_out)
    _check_points("spherical_harmonics_backward", xyz)
    if grad_out.shape != (xyz.shape[0], (degree + 1) ** 2) or grad_out.dtype != xyz.dtype:
        raise ValueError(f"locdiff::spherical_harmonics_backward: grad_out must be ({xyz.shape[0]}, "
                         f"{(degree + 1) ** 2}) {xyz.dtype} for xyz {tuple(xyz.shape)} at degree {degree}, "
                         f"got {tuple(grad_out.shape)} {grad_out.dtype}")
    if xyz.shape[0]:
        launch.run("sh", xyz, xyz.data_ptr(), grad_out.data_ptr(), xyz.shape[0], degree, grad_xyz.data_ptr(),
                   bwd=True)
    return grad_xyz


@spherical_harmonics_backward_op.register_fake
def _(xyz: torch.Tensor, grad_out: torch.Tensor, degree: int) -> torch.Tensor:
    return torch.empty_like(xyz)


def register_sh_autograd(forward_op, backward_op) -> None:
    """Autograd (and vmap) for a (forward, backward) pair of spherical-harmonics ops, any backend.

    The backward op computes grad_xyz = J(xyz)^T g. Its own derivative (double backward) goes
    through the differentiable pure-torch reference: slower, exact, rarely needed. Its VJPs
    are d(J^T g . v)/dxyz and J v.
    """

    def setup_forward(ctx, inputs, output):
        xyz, degree = inputs
        ctx.save_for_backward(xyz)
        ctx.degree = degree

    def backward(ctx, grad_out):
        (xyz,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return backward_op(xyz, grad_out.contiguous(), ctx.degree), None

    def setup_backward(ctx, inputs, output):
        xyz, grad_out, degree = inputs
        ctx.save_for_backward(xyz, grad_out)
        ctx.degree = degree

    def double_backward(ctx, grad_grad_xyz):
        xyz, grad_out = ctx.saved_tensors
        return (*reference_double_backward(xyz, grad_out, grad_grad_xyz, ctx.degree), None)

    forward_op.register_autograd(backward, setup_context=setup_forward)
    backward_op.register_autograd(double_backward, setup_context=setup_backward)
    _register_sh_vmap(forward_op, backward_op)


def reference_double_backward(xyz: torch.Tensor, grad_out: torch.Tensor, grad_grad_xyz: torch.Tensor,
                              degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VJPs of the backward op (xyz, g) -> J(xyz)^T g at ``grad_grad_xyz``: d(J^T g . v)/dxyz
    and J v, by torch.func.vjp of the pure-torch reference (which also runs inside torch.func's
    transforms; at degree 0 both are zeros)."""

    def vjp_of_harmonics(x, g):
        return torch.func.vjp(lambda y: spherical_harmonics_reference(y, degree), x)[1](g)[0]

    _, pull = torch.func.vjp(vjp_of_harmonics, xyz, grad_out)
    return pull(grad_grad_xyz)


def _register_sh_vmap(forward_op, backward_op) -> None:
    """``torch.func.vmap`` rules: the mapped points are one longer batch of the same op (one
    kernel launch, not one per mapped slice as torch's fallback does)."""

    def batched(info, in_dims, *tensors):
        # Each mapped tensor (..., 3) with its vmap dim first, broadcast to the batch size.
        return [t.unsqueeze(0).expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
                for t, d in zip(tensors, in_dims)]

    def forward(info, in_dims, xyz, degree):
        (x,) = batched(info, in_dims[:1], xyz)
        out = forward_op(x.reshape(-1, 3).contiguous(), degree)
        return out.reshape(*x.shape[:-1], out.shape[-1]), 0

    def backward(info, in_dims, xyz, grad_out, degree):
        x, g = batched(info, in_dims[:2], xyz, grad_out)
        out = backward_op(x.reshape(-1, 3).contiguous(), g.reshape(-1, g.shape[-1]).contiguous(), degree)
        return out.reshape(x.shape), 0

    forward_op.register_vmap(forward)
    backward_op.register_vmap(backward)


register_sh_autograd(spherical_harmonics_op, spherical_harmonics_backward_op)
