"""The host-compute thread: runs a host share while the calling thread drives the device's share.

One worker, so host shares of consecutive layers never compete with each other; the intra-op thread
pool it computes with is PyTorch's (sized by `host_threads`). On a CPU device the calling thread's
share runs on the same cores at the same time, so the worker computes on itself alone
(`cpu_threads.single_threaded`: a second OpenMP pool would also slow every op of the calling
thread). Autograd is off on the worker: host compute only serves passes without grad.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from ..cpu_threads import single_threaded


class HostWorker:
    def __init__(self, device: torch.device) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._init = single_threaded if device.type == "cpu" else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> "Future[tuple[Any, float]]":
        """Run fn(*args) on the worker; the future holds (result, seconds it took)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torus-host", initializer=self._init)
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
