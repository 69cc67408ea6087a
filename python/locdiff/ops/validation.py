"""Input checks shared by the op wrappers: messages name the argument, the value and what
is expected (docs/conventions.md, "Errors"). Kernels assume what these functions guarantee."""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch.autograd import forward_ad

# Accuracy is verified up to 2048 (tests/test_sh_accuracy.py); the recurrences stay stable
# beyond, so allow some headroom without promising the tolerance there.
MAX_DEGREE = 4096


def check_degree(degree, name: str = "degree", max_degree: int = MAX_DEGREE) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int):
        try:
            import numpy as np

            if isinstance(degree, np.integer):
                degree = int(degree)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"{name} must be a non-negative int, got {degree!r} ({type(degree).__name__})") from None
    if degree < 0 or degree > max_degree:
        raise ValueError(f"{name} must be an int in [0, {max_degree}], got {degree}")
    return degree


# Kernel backends of the public functions: None / "native" (C++ on CPU, CUDA on GPU), "triton".
BACKENDS = (None, "native", "triton")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# The device types locdiff has kernels for (locdiff.ops.registry).
DEVICE_TYPES = ("cpu", "cuda")


def check_device_type(device: torch.device, subject: str) -> None:
    """NotImplementedError for a device type without kernels; ``subject`` says whose device
    it is ("coeffs is on meta", "device='mps'")."""
    if device.type not in DEVICE_TYPES:
        raise NotImplementedError(f"{subject}: locdiff runs on {' and '.join(DEVICE_TYPES)} devices")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device; a ValueError naming it when it is not one or this torch
    cannot use it (a CUDA device on a CPU-only build or past the last GPU), rather than
    torch's failure deep inside the first copy."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    check_device_type(dev, f"{name}={device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={device!r}: this torch sees no CUDA device "
                             f"(torch.cuda.is_available() is False); expected 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name}={device!r}: this machine has {count} CUDA device(s), "
                             f"expected an index in [0, {count - 1}]")
    return dev


def check_float_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_int(value, name: str, minimum: int = 1, note: str = "") -> int:
    """``value`` as an int (numpy integers too, not bools) of at least ``minimum``, or a
    ValueError naming ``name`` (``note``: what it counts, in the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{note}, got {value!r}")
    return int(value)


def check_last_dim(x, size: int, name: str) -> None:
    """A ValueError naming ``x`` (a tensor or array) unless its last dimension is ``size``."""
    if x.ndim == 0 or x.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got {tuple(x.shape)}")


def check_finite_nonzero_rows(x: torch.Tensor, name: str) -> None:
    """Non-finite entries or all-zero rows are errors (one device sync for both checks)."""
    if x.numel() == 0:
        return
    finite = torch.isfinite(x).all(-1)
    nonzero = (x != 0).any(-1)
    ok = finite & nonzero
    if bool(ok.all()):
        return
    raise_bad_row(x, int((~ok).reshape(-1).nonzero()[0, 0]), name)


def raise_bad_row(x: torch.Tensor, index: int, name: str) -> None:
    """ValueError for row ``index`` of ``x`` viewed as (-1, 3): non-finite or zero."""
    row = x.reshape(-1, x.shape[-1])[index]
    what = "non-finite coordinates" if not bool(torch.isfinite(row).all()) else "a zero vector (no direction)"
    raise ValueError(f"{name} row {index} is {what}: {row.tolist()}; expected finite, non-zero vectors")


def check_no_forward_ad(t: torch.Tensor, name: str) -> None:
    """NotImplementedError naming ``name`` for a tensor carrying a forward-mode tangent
    (torch.func.jvp / jacfwd, torch.autograd.forward_ad): the kernels' custom ops have no JVP
    and would return no tangent, a silent zero derivative."""
    if forward_ad.unpack_dual(t).tangent is not None:
        raise NotImplementedError(
            f"{name} carries a forward-mode tangent (torch.func.jvp / jacfwd, torch.autograd.forward_ad); "
            f"locdiff's kernels differentiate in reverse mode only: use backward(), torch.autograd.grad or "
            f"torch.autograd.functional.jacobian")


def native_array(arr, name: str, kinds: str, expected: str):
    """``arr`` as a numpy array torch can take: a TypeError naming ``name`` (``expected`` says
    what would do) unless its dtype kind is in ``kinds`` and no float is wider than float64;
    values stored in the other byte order are converted."""
    if arr.dtype.kind not in kinds or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
        raise TypeError(f"{name} must be {expected}, got dtype {arr.dtype}")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


@functools.cache  # two system calls, on every call of the public functions
def physical_memory_bytes() -> int | None:
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """The memory the system can give now (``MemAvailable`` of /proc/meminfo), or None
    where it does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_gpu_bytes(device: torch.device) -> int:
    """GPU memory a new tensor can take: the device's free memory and what torch's caching
    allocator holds unused (mem_get_info counts that as taken, so a second call of the same
    size after freeing the first would be refused)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_allocation(shape: tuple, dtype: torch.dtype, device: torch.device, name: str,
                     hint: str = "use fewer points or a lower degree") -> None:
    """Raise MemoryError before allocating an output that cannot fit: in free GPU memory, or
    in the memory available now on the CPU (read only for requests over an eighth of the
    machine's memory; smaller ones are left to the allocator)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * dtype.itemsize
    if device.type == "cuda":
        limit = free_gpu_bytes(device)
    else:
        limit = physical_memory_bytes() or 1 << 62
        if nbytes > limit // 8:
            limit = min(limit, available_memory_bytes() or limit)
    if nbytes > limit:
        raise MemoryError(
            f"{name} of shape {tuple(shape)} ({dtype}) needs {nbytes / 2**30:.1f} GiB, more than the "
            f"{limit / 2**30:.1f} GiB available on {device}; {hint}"
        )


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: its dims of size > 1, by stride, must
    each step past the farthest element of the finer ones (a sufficient test)."""
    reach = 0
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_out(out, xyz: torch.Tensor, shape: tuple, name: str = "out") -> None:
    """An out= buffer: a tensor of exactly ``shape``, xyz's dtype and device, not overlapping
    xyz, and no autograd (out= results are not differentiable, as in torch)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (a numpy array when xyz is one), got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != xyz.dtype:
        # Plain names: the buffers may be numpy arrays seen through torch.
        plain = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        raise TypeError(f"{name} must have xyz's dtype {plain(xyz.dtype)}, got {plain(out.dtype)}")
    if out.device != xyz.device:
        raise ValueError(f"{name} must be on xyz's device {xyz.device}, got {out.device}")
    if torch.is_grad_enabled() and (xyz.requires_grad or out.requires_grad):
        raise ValueError(f"{name}= results are not differentiable, but xyz or {name} requires grad; "
                         f"call without {name}= for autograd, or under torch.no_grad()")
    if _overlaps_itself(out):
        raise ValueError(f"{name} has elements that may share memory (strides {out.stride()}, as of an expanded "
                         f"view); expected a buffer with one place per value")
    if out.numel() and xyz.numel() and not torch.compiler.is_compiling():
        a, b = out.untyped_storage(), xyz.untyped_storage()
        if a.data_ptr() < b.data_ptr() + b.nbytes() and b.data_ptr() < a.data_ptr() + a.nbytes():
            raise ValueError(f"{name} shares memory with xyz; expected a separate buffer")
