"""Pure-torch reference for ``locdiff::spherical_harmonics`` (tests and double backward).

The same convention as the kernels (csrc/include/locdiff/sh_math.h) in its Cartesian
polynomial form: Y_lm = sqrt2 Qbar_lm(z) Re/Im (x + i y)^m, with Qbar_lm the orthonormal
Legendre function divided by sin^m. Every step is a polynomial in (x, y, z), so autograd
differentiates it any number of times, poles included. Qbar grows like l^m, so this form
overflows float64 beyond degree ~1000; it is a reference, never the fast path.
"""
from __future__ import annotations

import math

import torch


def spherical_harmonics_reference(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    """``(..., 3)`` -> ``(..., (degree+1)**2)``, computed with plain tensor ops."""
    xyz = xyz / torch.linalg.vector_norm(xyz, dim=-1, keepdim=True)
    x, y, z = xyz.unbind(-1)
    # A_m + i B_m = (x + i y)^m by complex multiplication, kept real for autograd.
    re, im = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(degree):
        re.append(re[-1] * x - im[-1] * y)
        im.append(re[-2] * y + im[-1] * x)
    out = [None] * ((degree + 1) ** 2)
    for m in range(degree + 1):
        # Qbar_mm is a constant: sqrt((2m+1)!! / (2m)!! / (4 pi)) built as a running product.
        q_mm = 1.0 / math.sqrt(4 * math.pi)
        for k in range(1, m + 1):
            q_mm *= math.sqrt((2 * k + 1) / (2 * k))
        q_prev2, q_prev = None, torch.full_like(z, q_mm)
        for l in range(m, degree + 1):
            if l == m + 1:
                q = math.sqrt(2 * m + 3) * z * q_prev
            elif l >= m + 2:
                a = math.sqrt((4 * l * l - 1) / (l * l - m * m))
                b = math.sqrt(((l - 1) ** 2 - m * m) * (2 * l + 1) / ((l * l - m * m) * (2 * l - 3)))
                q = a * z * q_prev - b * q_prev2
            else:
                q = q_prev
            if l > m:
                q_prev2, q_prev = q_prev, q
            if m == 0:
                out[l * l + l] = q
            else:
                out[l * l + l + m] = math.sqrt(2) * q * re[m]
                out[l * l + l - m] = math.sqrt(2) * q * im[m]
    return torch.stack(out, -1)
