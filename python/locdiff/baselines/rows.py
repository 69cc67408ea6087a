"""Embedding rows as the baselines read them: any array, memory map, list or torch tensor
(any float dtype and device, with or without grad) as float32 numpy, checked."""
from __future__ import annotations

import numpy as np
import torch


def float_rows(a, name: str, offset: int = 0) -> np.ndarray:
    """``a`` (n, D) as a new float32 array: a TypeError naming ``name`` for complex, bool or
    non-numeric values (a cast would drop or invent them), a ValueError naming the first row
    holding a NaN or infinity, counted from ``offset`` (``a`` being a block of a larger set)."""
    if isinstance(a, torch.Tensor):
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got {a.dtype}")
        a = a.detach().cpu()
        a = (a.float() if a.is_floating_point() else a).numpy()  # (numpy has no bfloat16)
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=-1)) if out.ndim == 2 else []
    if len(bad):
        raise ValueError(f"{name} row {offset + int(bad[0])} is NaN or infinite")
    return out
