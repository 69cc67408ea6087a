"""Public spherical harmonics: ``spherical_harmonics(xyz, degree)`` and the
``SphericalHarmonics`` location-encoder module."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from locdiff.geo import latlon_to_xyz
from locdiff.ops import sh_api as ops_sh
from locdiff.ops import registry, validation

BACKENDS = validation.BACKENDS
# CPU outputs of at most this many values (8 MB in float64) fit in any machine's memory, so
# they skip the allocation check, a measurable part of a one-point call. A GPU's free memory
# can be smaller than that, so on CUDA the check always runs (docs/kernels.md, "Per-call costs").
_FITS_ANYWHERE = 1 << 20
# numpy in, numpy out, straight on the arrays' memory up to this many values (128 KB in
# float64, glibc's first mmap threshold); larger outputs take the torch route, whose output
# pool keeps glibc from handing memory back and faulting it in again (docs/kernels.md).
_SMALL = 1 << 14
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def spherical_harmonics(xyz, degree: int, *, backend: str | None = None, validate: bool = True, out=None):
    """All real orthonormal spherical harmonics up to ``degree`` at the directions ``xyz``.

    ``xyz`` is ``(..., 3)`` (normalised inside; zero vectors are errors), a torch tensor on
    CPU or CUDA or a numpy array (numpy in, numpy out). Output ``(..., (degree+1)**2)`` in
    the input's dtype, flat index ``k = l*l + l + m``, no Condon-Shortley phase; float64
    within 1e-11 and float32 within 2e-6 of exact for every degree up to 2048 (float16 and
    bfloat16 inputs are computed in float32 and rounded to their dtype).
    Differentiable w.r.t. ``xyz`` (analytic gradient, finite at the poles).

    ``backend``: None or "native" for the compiled kernels (C++ on CPU, CUDA on GPU), or
    "triton" for the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).
    Non-finite or zero rows raise ValueError. On the CPU the kernel checks them for free; on
    CUDA the check costs one pass and a device sync, which ``validate=False`` skips (as does
    ``torch.compile``; shapes, dtypes and degree are always checked).

    ``out``: a buffer to write into and return instead of a new array: shape
    ``(..., (degree+1)**2)``, xyz's dtype and device (a numpy array for numpy input). Not
    differentiable. Reusing one buffer across calls saves the page faults of a fresh
    multi-megabyte output, which at high degree can cost more than the harmonics. On a bad
    row its contents are unspecified.

    >>> import numpy as np, locdiff
    >>> locdiff.spherical_harmonics(np.array([0.0, 0.0, 1.0]), 1).round(6)
    array([0.282095, 0.      , 0.488603, 0.      ])
    """
    if isinstance(xyz, np.ndarray) or not isinstance(xyz, torch.Tensor):
        arr = validation.native_array(np.asarray(xyz), "xyz", "f", "a floating-point array (float16, float32 or "
                                      "float64)")
        if arr.ndim == 0:
            raise ValueError("xyz must have shape (..., 3), got a scalar")
        if out is None and backend in (None, "native") and arr.dtype in _KERNEL_DTYPES and arr.ndim and arr.shape[-1] == 3:
            degree = validation.check_degree(degree)
            if arr.size // 3 * (degree + 1) ** 2 <= _SMALL:
                return ops_sh.forward_cpu_numpy(np.ascontiguousarray(arr), degree)
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy array when xyz is one, got {type(out).__name__}")
            if not out.flags.writeable:
                raise ValueError("out must be a writeable array, got a read-only one")
            if not out.dtype.isnative:  # torch reads native byte order only: fill it by copy
                result = spherical_harmonics(arr, degree, backend=backend, validate=validate)
                if out.shape != result.shape:
                    raise ValueError(f"out must have shape {result.shape}, got {out.shape}")
                out[...] = result
                return out
        result = spherical_harmonics(torch.from_numpy(np.ascontiguousarray(arr)), degree, backend=backend,
                                     validate=validate, out=None if out is None else torch.from_numpy(out))
        return out if out is not None else result.numpy()
    validation.check_float_tensor(xyz, "xyz")
    validation.check_last_dim(xyz, 3, "xyz")
    validation.check_no_forward_ad(xyz, "xyz")
    degree = validation.check_degree(degree)
    validation.check_backend(backend)
    # A device with no implementation (meta, mps, ...) is named before any check reads values;
    # the CPU has every backend, so its calls skip the lookup.
    if xyz.device.type != "cpu":
        registry.row("spherical_harmonics", xyz.device.type, backend)
    lead = xyz.shape[:-1]
    n = math.prod(lead)
    K = (degree + 1) ** 2
    if out is not None:
        validation.check_out(out, xyz, (*lead, K))
    if not torch.compiler.is_compiling():
        # The CPU kernel checks rows itself at no cost; elsewhere it is one extra pass + sync.
        if validate and (xyz.device.type != "cpu" or backend == "triton"):
            validation.check_finite_nonzero_rows(xyz.detach(), "xyz")
        if out is None and (n * K > _FITS_ANYWHERE or not xyz.is_cpu):
            validation.check_allocation((n, K), xyz.dtype if xyz.dtype == torch.float64 else torch.float32,
                                        xyz.device, "spherical_harmonics output")
    # Half precision has too few bits for a unit vector at high degree: compute in float32.
    compute_dtype = xyz.dtype if xyz.dtype in (torch.float32, torch.float64) else torch.float32
    flat = xyz
    if xyz.ndim != 2 or xyz.dtype != compute_dtype or not xyz.is_contiguous():
        # Only when needed: each costs a call even as a no-op (docs/kernels.md, "Per-call costs").
        flat = xyz.reshape(n, 3).to(compute_dtype).contiguous()
    if out is not None and backend != "triton" and out.dtype == compute_dtype and out.is_contiguous():
        ops_sh.spherical_harmonics(flat, degree, backend, out.view(n, K))
        return out
    result = ops_sh.spherical_harmonics(flat, degree, backend)
    if xyz.ndim != 2:
        result = result.reshape(*lead, K)
    if result.dtype != xyz.dtype:
        result = result.to(xyz.dtype)
    if out is not None:  # a strided or half-precision buffer, or the Triton backend: one copy
        return out.copy_(result)
    return result


class SphericalHarmonics(nn.Module):
    """Location encoder: ``(..., 2)`` (lat, lon) degrees -> ``(..., (degree+1)**2)`` SH features.

    The first layer of SH + SirenNet location encoders (Russwurm et al., ICLR 2024), exact to
    any degree. Not trainable; its output dtype follows the input.

    >>> enc = SphericalHarmonics(10)
    >>> enc(torch.tensor([[48.85, 2.35]])).shape
    torch.Size([1, 121])
    """

    def __init__(self, degree: int):
        super().__init__()
        self.degree = validation.check_degree(degree)

    @property
    def embedding_dim(self) -> int:
        return (self.degree + 1) ** 2

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        return spherical_harmonics(latlon_to_xyz(latlon), self.degree)

    def extra_repr(self) -> str:
        return f"degree={self.degree}"
