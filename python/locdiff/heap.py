"""Freed memory handed back to the system between the chunks of long passes.

glibc's allocator keeps the pages of freed large temporaries for reuse; in a chunked pass
over many rows, whatever stays alive between chunks splits them, and resident memory grows
with the rows (docs/evaluation.md, "Memory on large sets"). ``malloc_trim`` returns the
free pages at a chunk's end; without glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import functools
import platform


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (glibc's ``malloc_trim(0)``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
