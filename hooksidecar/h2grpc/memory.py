"""Giving the C heap a large call freed back to the system (glibc's ``malloc_trim``).

Measured (docs/ARCHITECTURE.md, "RSS after the largest domain"): after one call on the largest
domain the sidecar accepts, nothing stays allocated (Python's traced memory +6 KiB, glibc's bytes
in use +80 KiB), but the worker thread's malloc arena keeps the ~18 MiB the call's lxml tree freed:
glibc returns a non-main arena's memory only from the top of its heap, and a few small chunks still
in use above the freed ones keep it there. ``malloc_trim(0)`` gives the free pages of every arena
back (``MADV_DONTNEED``) in ~3 ms. Small calls never trim (nor import ``ctypes``, ~0.7 MiB).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

_lock = threading.Lock()
_trim: Callable[[int], int] | None = None
_looked = False


def _find_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library (musl has none)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):  # the name is unknown: not glibc
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim(pad: int) -> int:
        return int(fn(pad))

    return trim


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the system; False where this cannot be done."""
    global _trim, _looked
    with _lock:
        if not _looked:
            _trim, _looked = _find_trim(), True
        trim = _trim
    if trim is None:
        return False
    trim(0)
    return True
