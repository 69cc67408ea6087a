"""Triton kernels (``backend="triton"``). Importing this package imports Triton; nothing
else in locdiff does, so locdiff works without it."""
try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "locdiff's Triton backend needs the triton package, which is not installed: "
        "pip install triton (or pip install 'locdiff[triton]'); "
        "or use backend=None / 'native' for the compiled kernels"
    ) from exc

from locdiff.ops.triton.refine import refine_triton
from locdiff.ops.triton.sh_triton import (
    sh_dot_and_gradient_triton,
    spherical_harmonics_triton,
    spherical_harmonics_triton_backward_op,
    spherical_harmonics_triton_op,
)

__all__ = ["refine_triton", "sh_dot_and_gradient_triton", "spherical_harmonics_triton", "spherical_harmonics_triton_op",
           "spherical_harmonics_triton_backward_op"]
