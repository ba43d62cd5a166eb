"""Measure the host→device link the engine streams over."""

from __future__ import annotations

import time

import torch


def probe_bandwidth(device: torch.device | str, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes per second of one contiguous host→device copy of `nbytes`.

    CUDA: page-locked host buffer, copied on a side stream, timed with CUDA events (what the
    `cuda` transport does). CPU: a plain memcpy between two host buffers (what the `copy`
    transport does).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        stream = torch.cuda.Stream(device=dev)
        best = float("inf")
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)  # warm-up
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1000.0)
        return nbytes / best
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
