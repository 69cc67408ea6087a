"""The spherical-harmonics calls of the library layer (locdiff.sh): the implementation for the
tensor's device and backend from locdiff.ops.registry, or the direct CPU routes where no
one can observe the op."""
from __future__ import annotations

import torch

from locdiff.ops.registry import pick
from locdiff.ops.sh import can_skip_dispatch, forward_cpu
from locdiff.ops.sh import forward_cpu_numpy  # noqa: F401  (the numpy route, re-exported)
from locdiff.ops.sh_func import spherical_harmonics_in_transforms


def spherical_harmonics(flat: torch.Tensor, degree: int, backend: str | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The library's one call: (N, 3) contiguous float32/float64 -> (N, (degree+1)^2), or into
    ``out`` (N, K) when it is contiguous and of flat's dtype (returned then). The
    implementation comes from locdiff.ops.registry; on the CPU, calls nothing can observe
    skip the op's dispatch (can_skip_dispatch)."""
    if backend == "triton":
        fn = pick("spherical_harmonics", flat.device.type, backend)  # a CPU tensor is named first
        from locdiff.ops.triton.sh_triton import _check

        _check(flat, degree)
        result = fn(flat, degree)
        return result if out is None else out.copy_(result)
    if out is not None:
        pick("spherical_harmonics_out", flat.device.type)(flat, degree, out)
        return out
    if can_skip_dispatch(flat):
        return forward_cpu(flat, degree)
    # torch.func.grad, vjp, jacrev, vmap (torch.compile traces the op and its formulas).
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(flat):
        return spherical_harmonics_in_transforms(flat, degree)
    return pick("spherical_harmonics", flat.device.type)(flat, degree)
