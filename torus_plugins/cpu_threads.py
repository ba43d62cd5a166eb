"""Helper threads that run torch ops without a thread pool of their own.

Why: with PyTorch's OpenMP backend (libgomp), every thread that opens a parallel region gets its
own pool of OpenMP threads. Once the pools together hold more threads than the machine has CPUs,
libgomp stops its idle workers spinning between regions ("throttled" spin: they sleep at once),
so every later parallel op on the thread that does the real work pays a wake-up. Measured on the
2-core machine this project is built on: a 14 µs int4 matrix-vector product took 94 µs, for the
rest of the process, after a single `copy_` had run on the CPU copy transport's thread.

`single_threaded()` is the initializer of the engine's helper threads (the copy transport's copy
thread, the host-compute worker on a CPU device): their torch ops run on the helper itself, which
is what a helper beside a compute thread on the same cores should do anyway.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import torch

#: OpenMP runtimes PyTorch builds link (GNU, Intel, LLVM), by the name they are loaded under.
RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")


@lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch already loaded (never loads one)."""
    torch.get_num_threads()  # make sure torch (and its runtime) is initialised
    noload = getattr(os, "RTLD_NOLOAD", 0)
    if not noload:
        return None  # not Linux/macOS: nothing to find without loading
    for name in RUNTIMES:
        try:
            return ctypes.CDLL(name, mode=noload | os.RTLD_LAZY)
        except OSError:
            continue
    return None


def single_threaded() -> None:
    """Make the calling thread's torch ops run on this thread alone (see the module docstring).
    Affects only the calling thread; a no-op where torch has no OpenMP runtime."""
    torch.get_num_threads()  # torch's per-thread set-up runs first, or it would undo the line below
    lib = _openmp()
    if lib is not None:
        lib.omp_set_num_threads(1)


__all__ = ["single_threaded"]
