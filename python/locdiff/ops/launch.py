"""How op wrappers reach the compiled kernels: the binding ``_C.<op>_<device>[_bwd]``, its
trailing thread count (CPU) or CUDA stream, the dtype tag, and what keeps raw pointers
honest (every tensor contiguous and on one device). Also the fork rule for OpenMP
(docs/kernels.md, "Threads and fork")."""
from __future__ import annotations

import functools
import os
import typing

import torch
from torch import Tensor

from locdiff import _C


def dtype_tag(t: Tensor, op: str = "kernel") -> str:
    """The kernels' name for t's dtype; any other dtype would be read as one of these."""
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"locdiff::{op}: the kernels take float32 or float64 tensors, got {t.dtype}")
    return "float32" if t.dtype == torch.float32 else "float64"


def grid_args(table: Tensor, theta: Tensor, log_area: Tensor, nlat: int, nlon: int, lon0: float,
              one_mode_per_polar_ring: bool = False) -> tuple:
    """A ring grid as the kernels take it: (nlat, nlon, table, theta, log_area, lon0, and
    whether the local-maximum scan keeps one maximum per polar ring)."""
    return (nlat, nlon, table.data_ptr(), theta.data_ptr(), log_area.data_ptr(), float(lon0),
            bool(one_mode_per_polar_ring))


def contiguous_inputs(kernel):
    """``kernel`` (an op's implementation) with its tensor arguments made contiguous: the
    kernels read raw pointers as dense rows, and an op reached directly (``torch.ops.locdiff``,
    a torch.func fallback) may be handed a strided view. Contiguous tensors pass as they are.
    The signature and its resolved type hints are kept: the op's schema is read from them,
    and string annotations would otherwise be looked up in this module."""

    @functools.wraps(kernel)
    def with_contiguous_inputs(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, Tensor) else a for a in args]
        kwargs = {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return kernel(*args, **kwargs)

    with_contiguous_inputs.__annotations__ = typing.get_type_hints(kernel)
    return with_contiguous_inputs


def one_device(op: str, **tensors: Tensor) -> None:
    """ValueError unless every tensor is on the first one's device: a kernel handed a pointer
    from another device reads garbage (on CUDA, a sticky illegal-address error)."""
    items = iter(tensors.items())
    first_name, first = next(items)
    for name, t in items:
        if t.device != first.device:
            raise ValueError(f"locdiff::{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"expected every tensor on one device")


# What the CUDA kernels raise when a scratch buffer cannot be allocated (csrc/cuda/shdd_cuda.cu).
SCRATCH_OOM = "locdiff CUDA alloc: out of memory"


def run(op: str, like: Tensor, *args, bwd: bool = False):
    """``_C.<op>_<device>[_bwd](*args, threads or stream, dtype tag of like)`` on like's device."""
    name = f"{op}_{like.device.type}{'_bwd' if bwd else ''}"
    kernel = getattr(_C, name, None)
    if kernel is None:
        raise NotImplementedError(f"locdiff has no {like.device.type} kernel for {op} ({name})")
    if like.device.type == "cpu":
        return kernel(*args, torch.get_num_threads(), dtype_tag(like, op))
    with torch.cuda.device(like.device):
        # The kernels' scratch buffers come from the driver, beside torch's cache: on running
        # out, hand that back and try once more, then fail as torch does.
        for attempt in (1, 2):
            try:
                return kernel(*args, torch.cuda.current_stream(like.device).cuda_stream, dtype_tag(like, op))
            except RuntimeError as err:
                if SCRATCH_OOM not in str(err):
                    raise
            if attempt == 1:
                torch.cuda.empty_cache()
        raise torch.OutOfMemoryError(f"locdiff {op} on {like.device}: no GPU memory for its scratch buffers "
                                     f"(up to 128 MB per grid) even after torch.cuda.empty_cache(); use "
                                     "smaller batches or free GPU memory")


def _one_thread_in_forked_child() -> None:
    # OpenMP's thread pool does not survive fork(): a forked child that enters a parallel
    # region after the parent ran one waits forever for threads it does not have. One
    # thread in the child avoids the pool; torch.set_num_threads(n) there opts back in.
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_in_forked_child)
