"""Which torch device a command runs on, from what the user asked for."""
from __future__ import annotations

from locdiff.errors import DataError


def resolve_device(device: str | None = None):
    """``"auto"``/None: CUDA when available, else CPU. An explicit CUDA request without CUDA
    is an error, never a silent CPU run."""
    import torch  # here, so that importing the photo tools stays light

    from locdiff.ops.validation import check_device

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    try:  # the library's own check: device types with kernels, CUDA present, index in range
        return check_device(device, "--device")
    except (ValueError, NotImplementedError) as err:
        raise DataError(str(err)) from None
