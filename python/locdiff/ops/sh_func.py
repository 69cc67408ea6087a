"""Spherical harmonics under torch.func's reverse-mode transforms (grad, vjp, jacrev, and vmap
over them).

torch refuses those transforms on a custom op's own autograd (torch.library's generated
Function has no ``setup_context``). Inside a transform, locdiff.ops.sh_api routes through the
Functions here instead: the same forward and backward ops and double backward
(ops/sh.py, reference_double_backward). Forward mode (jvp, jacfwd, hessian) stays refused:
the kernels have no JVP (docs/conventions.md).
"""
from __future__ import annotations

import torch

from locdiff.ops.sh import reference_double_backward, spherical_harmonics_backward_op, spherical_harmonics_op


class _Backward(torch.autograd.Function):
    """grad_xyz = J(xyz)^T g, differentiable again through the reference."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xyz, grad_out, degree):
        return spherical_harmonics_backward_op(xyz, grad_out, degree)

    @staticmethod
    def setup_context(ctx, inputs, output):
        xyz, grad_out, degree = inputs
        ctx.save_for_backward(xyz, grad_out)
        ctx.degree = degree

    @staticmethod
    def backward(ctx, grad_grad_xyz):
        xyz, grad_out = ctx.saved_tensors
        return (*reference_double_backward(xyz, grad_out, grad_grad_xyz, ctx.degree), None)


class _Forward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(xyz, degree):
        return spherical_harmonics_op(xyz, degree)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.degree = inputs[1]

    @staticmethod
    def backward(ctx, grad_out):
        (xyz,) = ctx.saved_tensors
        return _Backward.apply(xyz, grad_out.contiguous(), ctx.degree), None


def spherical_harmonics_in_transforms(flat: torch.Tensor, degree: int) -> torch.Tensor:
    """(N, 3) -> (N, (degree+1)^2) for a tensor a torch.func transform wraps."""
    return _Forward.apply(flat, degree)
