"""Process-level CPU tuning that changes speed, never results.

On glibc, every tensor above malloc's mmap threshold gets fresh pages from the kernel and gives them back when
freed, so each large temporary (a [C, V] logits or probability tensor) pays one page fault per 4 KiB. In a VM that
costs ~3 ms per 4 MB tensor, more than the math on it (measured: copying two 4 MB tensors 6.1 ms -> 0.5 ms once
freed memory is kept). `tune_allocator` raises the mmap and trim thresholds so freed blocks are reused. Set
DGEMMA_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_tuned: bool | None = None


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Keep freed heap memory for reuse (glibc only, once per process). Returns whether the tuning is active."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("DGEMMA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for size in (threshold, 32 << 20):  # older glibc caps the mmap threshold at 32 MiB
        if mallopt(M_MMAP_THRESHOLD, size) == 1:
            _tuned = mallopt(M_TRIM_THRESHOLD, 2 * size) == 1
            break
    return _tuned


def release_memory() -> None:
    """Hand freed heap memory back to the OS (after dropping a model the tuned allocator would otherwise keep)."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
