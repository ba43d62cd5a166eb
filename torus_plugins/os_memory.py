"""Giving host memory the engine no longer needs back to the operating system.

Two kinds, both measured on a 3B-class model (issue 26):

- Pages of the checkpoint. transformers 5 maps safetensors files and reads a tensor's pages only
  when it is used; packing an FFN layer into the host store reads them, and they would stay in the
  process's resident set (file-backed, but counted: a 3B model's 4 GiB of FFN pages) for as long as
  the shard stays mapped, which the non-FFN tensors of the same shard keep it. `release_pages`
  asks the kernel to reclaim them (MADV_PAGEOUT): clean file pages are dropped and re-read from
  the file should anything touch them again; contents never change, and anonymous memory without
  swap stays as it is. So attach holds one layer of the checkpoint at a time, not all of them.
- Freed heap. glibc keeps memory that large frees leave inside its arenas (below its mmap threshold, or
fragmented) for reuse; after attach that is the model's FFN tensors and quantizing's temporaries,
which this process will never allocate again in that size. `malloc_trim(0)` hands it back: one
measured 3B load went from 7.81 to 3.87 GiB of anonymous memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch


@functools.cache
def _libc(name: str, argtypes: tuple, restype: type = ctypes.c_int):  # noqa: ANN202
    """libc's function `name` on Linux (None elsewhere, or where this C library lacks it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _malloc_trim():  # noqa: ANN202
    return _libc("malloc_trim", (ctypes.c_size_t,))  # glibc only: musl has none


def _madvise():  # noqa: ANN202
    return _libc("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


_MADV_PAGEOUT = 21  # Linux >= 5.4
_MADV_WILLNEED = 3
_MADV_RANDOM = 1
_PAGE = 4096


def _advise(start: int, end: int, advice: int, inner: bool) -> bool:
    """madvise the pages of [start, end): only those wholly inside (`inner`), else every page it
    touches. Whether the request was made and accepted."""
    madvise = _madvise()
    if inner:
        first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    else:
        first, last = start // _PAGE * _PAGE, -(-end // _PAGE) * _PAGE
    return madvise is not None and last > first and madvise(first, last - first, advice) == 0


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """[start, end) of a dense CPU tensor's bytes, None for another device or an empty one."""
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def release_pages(t: torch.Tensor, whole: bool = False) -> bool:
    """Ask the kernel to reclaim the whole pages inside `t`'s bytes (a CPU tensor the caller no
    longer reads); its values stay what they were. Whether the request was made and accepted.
    whole: also the pages `t` only starts or ends in (the caller owns them all, e.g. a mapped
    store unit that starts on a page and is followed by padding)."""
    span = _span(t)
    return span is not None and _advise(*span, _MADV_PAGEOUT, inner=not whole)


def release_range(start: int, end: int) -> bool:
    """`release_pages` for the whole pages between two addresses of memory the caller owns."""
    return _advise(start, end, _MADV_PAGEOUT, inner=True)


def will_need(t: torch.Tensor) -> bool:
    """Ask the kernel to start reading `t`'s pages now (MADV_WILLNEED: asynchronous read-ahead of
    a file-backed tensor about to be used); whether the request was made and accepted."""
    span = _span(t)
    return span is not None and _advise(*span, _MADV_WILLNEED, inner=False)


def read_randomly(t: torch.Tensor) -> bool:
    """Tell the kernel `t`'s pages are read in no order it can guess (MADV_RANDOM): no read-ahead
    around a page fault, the caller issues its own (`will_need`)."""
    span = _span(t)
    return span is not None and _advise(*span, _MADV_RANDOM, inner=False)


_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20


@functools.cache
def map_large_allocations() -> bool:
    """Pin glibc's mmap threshold at `MMAP_THRESHOLD` (once per process); whether it took.

    glibc raises its threshold each time a mapped block is freed (up to 32 MiB), after which blocks
    below it come from the heap. Packing a store then interleaves long-lived units with short-lived
    temporaries (a checkpoint tensor cast, quantizing's work space) in the heap, and the holes the
    temporaries leave are never returned: loading the 30B-A3B shape in int4 grew the heap to 23.6 GB
    for a 15 GB store and was killed. With a fixed threshold every unit and temporary of a MiB or
    more is its own mapping, handed back the moment it is freed."""
    fn = _libc("mallopt", (ctypes.c_int, ctypes.c_int))  # glibc
    return fn is not None and fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_free_heap() -> bool:
    """Give free heap pages back to the OS where the C library can (glibc); whether it did."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
