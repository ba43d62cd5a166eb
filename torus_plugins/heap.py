"""Returning freed heap to the operating system after attach.

glibc keeps memory that large frees leave inside its arenas (below its mmap threshold, or
fragmented) for reuse; after attach that is the model's FFN tensors and quantizing's temporaries,
which this process will never allocate again in that size. `malloc_trim(0)` hands it back: one
measured 3B load went from 7.81 to 3.87 GiB of anonymous memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl has none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Give free heap pages back to the OS where the C library can (glibc); whether it did."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
