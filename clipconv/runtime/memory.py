"""Process memory settings for CPU training: glibc keeps freed memory for the next step (a leaf module).

A training step on CPU allocates and frees the same activations every step. glibc serves allocations above
its mmap threshold (adaptive, at most 32 MB by default) with fresh mappings and returns freed heap tops above
its trim threshold to the kernel, so every step page-faults its activations in again (zero-filled by the
kernel: system time, and with several threads, cores waiting on each other). `retain_freed_memory` raises
both thresholds once per process; numbers are unchanged (only where memory comes from).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["retain_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: allocations below this come from the heap (glibc's M_MMAP_THRESHOLD)
MMAP_THRESHOLD = 1 << 30
#: freed memory at the top of the heap is kept up to this much (glibc's M_TRIM_THRESHOLD)
TRIM_THRESHOLD = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's own environment variables: when the user sets either, their choice stands
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_applied: list[bool] = []


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True when they are set now or were before.
    False off glibc, or when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set in the environment."""
    if _applied:
        return _applied[0]
    ok = False
    if not any(name in os.environ for name in _ENVIRONMENT):
        name = ctypes.util.find_library("c")
        try:
            mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None  # glibc (musl: a no-op)
        except OSError:
            mallopt = None
        if mallopt is not None:
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied.append(ok)
    return ok
