"""The host-compute thread: runs a host share while the calling thread drives the device's share.

One worker, so host shares of consecutive layers never compete with each other; the intra-op thread
pool it computes with is PyTorch's (sized by `host_threads`). Autograd is off on the worker: host
compute only serves passes without grad.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


class HostWorker:
    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> "Future[tuple[Any, float]]":
        """Run fn(*args) on the worker; the future holds (result, seconds it took)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torus-host")
        return self._pool.submit(timed, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return out, time.perf_counter() - t0
