"""CPU outputs of a megabyte or more from locdiff's block cache (csrc/include/locdiff/output_pool.h).

A fresh output of a megabyte or more costs page faults that at high degree exceed the
harmonics (docs/kernels.md, "Output memory"). Outputs of at least ``POOL_MIN_BYTES``
come instead from a cache of blocks that earlier outputs held and the caller has since
dropped; smaller ones stay with torch's allocator.
"""
from __future__ import annotations

import math
import os

import torch

from locdiff import _C
from locdiff.ops.validation import physical_memory_bytes

POOL_MIN_BYTES = 1 << 20
_ENV = "LOCDIFF_OUTPUT_CACHE_MB"


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; from the pool when it is large."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < POOL_MIN_BYTES or _C.output_pool_limit() == 0:
        return torch.empty(shape, dtype=dtype)
    # The tensor's storage keeps the block alive; the block returns to the pool with it.
    return torch.frombuffer(_C.PooledBlock(nbytes), dtype=dtype, count=numel).view(shape)


def set_output_cache(max_bytes: int) -> int:
    """Sets how many bytes of dropped CPU outputs locdiff keeps for reuse (default 1 GiB, or a
    sixteenth of the machine's memory where less, or the environment's
    LOCDIFF_OUTPUT_CACHE_MB); 0 turns the cache off and frees what it holds. Returns the
    previous limit."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"set_output_cache: max_bytes must be an integer >= 0, got {max_bytes!r}")
    previous = _C.output_pool_limit()
    _C.output_pool_set_limit(max_bytes)
    return previous


def output_cache_bytes() -> int:
    """Bytes the cache holds now in blocks no tensor uses."""
    return _C.output_pool_cached()


def _default_limit() -> int:
    # 1 GiB, or a sixteenth of the machine's memory where that is less.
    return min(1 << 30, (physical_memory_bytes() or 1 << 34) // 16)


def _limit_from_env() -> None:
    value = os.environ.get(_ENV)
    if value is None:
        _C.output_pool_set_limit(_default_limit())
        return
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{_ENV} must be a number of MB >= 0, got {value!r}")
    _C.output_pool_set_limit(int(mb * (1 << 20)))


_limit_from_env()
