"""Shared test helpers: one tolerance table and the list of devices to test on."""
from __future__ import annotations

import torch

# Comparisons between two implementations of the same formula (kernel vs reference).
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
# The accuracy contract (docs/conventions.md, "Accuracy") against an exact reference, per unit of sqrt((2l+1)/(4 pi)).
SH_ACCURACY = {torch.float32: 2e-6, torch.float64: 1e-11}


def devices() -> list[str]:
    """'cpu', plus 'cuda' when a GPU is present and this build has the CUDA kernels."""
    from locdiff import _C

    out = ["cpu"]
    if torch.cuda.is_available() and _C.has_cuda():
        out.append("cuda")
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **overrides) -> None:
    tol = dict(TOLERANCES[actual.dtype])
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)
