"""Built-in transports: CUDA copy stream, CPU copy worker, and CPU zero-copy.

The CUDA and CPU-copy transports share every rule the engine enforces (slot ring, fences,
"copy after the readers finished", "compute after the copy landed"); they differ only in the
copy primitive and in what a fence is. That is what lets CPU tests exercise the CUDA ordering.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import warnings

import torch

from ..config import parse_bandwidth
from ..cpu_threads import single_threaded
from ..errors import ConfigError, TransferError
from ..hookspecs import hookimpl
from ..transfer import Fence, PendingStall, TransportOptions


class CpuCopyWorker:
    """Copies on one background thread, in submission order (FIFO like a CUDA stream). The thread
    copies on itself alone (`cpu_threads.single_threaded`): an OpenMP pool of its own would slow
    every parallel op of the compute thread for the rest of the process.

    Compute on the CPU is synchronous, so by the time the engine asks for a compute fence every
    reader of the slot has finished: `compute_fence` is `None`, and a copy may start at once.
    """

    name = "copy"
    zero_copy = False

    def __init__(self, opts: TransportOptions) -> None:
        self.device = opts.device
        self.timeout_s = opts.timeout_s
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="torus-copy", initializer=single_threaded)

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _copy_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence) -> Fence:
        # `after` is always None here (see class docstring); FIFO order keeps copies into the
        # same slot from overtaking each other.
        return self._pool.submit(self._copy_now, dst, src)

    def compute_fence(self) -> Fence:
        return None

    def wait(self, fence: Fence) -> float:
        if fence is None:
            return 0.0
        if fence.done():
            fence.result()  # re-raises a worker failure
            return 0.0
        t0 = time.perf_counter()
        try:
            fence.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            raise TransferError(
                f"a host→device copy did not finish within {self.timeout_s:g} s "
                f"(transfer_timeout_s); the copy worker is stuck or overloaded"
            ) from None
        return time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class SimulatedLink(CpuCopyWorker):
    """The CPU copy worker behind a simulated host→device link of fixed bandwidth and latency.

    A link clock paces every copy, one at a time like a DMA engine: a copy issued at `t` lands
    at `max(t, link busy until) + latency + nbytes / bandwidth`, so compute/transfer overlap can
    be measured with no GPU. Options (`TorusConfig.options`): `link_bandwidth` (bytes/s or
    "25GB/s", default "16GB/s"), `link_latency_s` (default 10e-6) and `link_mode`:

    - "copy" (default): the bytes really move into the slot (the worker copies, then sleeps until
      the landing time), so everything the engine does with a slot is exercised. On a CPU the
      memcpy competes with compute for memory bandwidth, which a GPU's DMA engine does not.
    - "time-only": nothing is copied and no thread runs. The link is a clock: a copy issued at
      `t` lands at `max(t, link busy until) + latency + nbytes / bandwidth`, and a wait sleeps
      until then; compute then reads the host store (`aliases_source`). The ring, fences,
      prefetch timing and stalls are the engine's own, so this measures overlap the way a GPU's
      DMA engine would see it, without memcpy traffic or thread hand-offs on the CPU.
    """

    name = "simulated-link"

    def __init__(self, opts: TransportOptions) -> None:
        super().__init__(opts)
        mode = opts.options.get("link_mode", "copy")
        if mode not in ("copy", "time-only"):
            raise ConfigError(f"link_mode must be 'copy' or 'time-only', got {mode!r}")
        self.aliases_source = mode == "time-only"
        self.bandwidth = parse_bandwidth(opts.options.get("link_bandwidth", "16GB/s"), "link_bandwidth")
        latency = opts.options.get("link_latency_s", 10e-6)
        if not isinstance(latency, (int, float)) or isinstance(latency, bool) or not 0 <= latency < 10:
            raise ConfigError(f"link_latency_s must be a number of seconds in [0, 10), got {latency!r}")
        self.latency = float(latency)
        self._busy_until = 0.0  # time-only: when the link finishes its last queued copy

    def _duration(self, src: torch.Tensor) -> float:
        return self.latency + src.numel() * src.element_size() / self.bandwidth

    def _land_at(self, src: torch.Tensor) -> float:
        # FIFO like a DMA queue: a copy starts when issued or when the previous one ends.
        self._busy_until = max(time.perf_counter(), self._busy_until) + self._duration(src)
        return self._busy_until

    def _copy_until(self, dst: torch.Tensor, src: torch.Tensor, land_at: float) -> None:
        dst.copy_(src)
        remaining = land_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence) -> Fence:
        land_at = self._land_at(src)
        if self.aliases_source:
            return land_at
        # The worker really copies, then sleeps until the link clock says the bytes landed:
        # pacing follows the nominal bandwidth however long the memcpy itself took.
        return self._pool.submit(self._copy_until, dst, src, land_at)

    def wait(self, fence: Fence) -> float:
        if not self.aliases_source:
            return super().wait(fence)
        t0 = time.perf_counter()
        if fence is None or fence <= t0:
            return 0.0
        if fence - t0 > 0.002:
            time.sleep(fence - t0 - 0.001)  # sleep most of it, then spin for precision
        while time.perf_counter() < fence:
            pass
        return time.perf_counter() - t0


class _CudaStall:
    """Two timing events around a device-side wait; read lazily, never on the hot path."""

    __slots__ = ("start", "end")

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.start, self.end = start, end

    def finished(self) -> bool:
        return self.end.query()

    def seconds(self) -> float:
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


class CudaCopyStream:
    """Copies on a dedicated CUDA stream from pinned host memory, ordered with CUDA events.

    No host-side synchronisation in the steady state: the copy stream waits on the event that
    marks the end of the slot's previous readers, and the compute stream waits on the event that
    marks the copy's end.
    """

    name = "cuda"
    zero_copy = False

    def __init__(self, opts: TransportOptions) -> None:
        if opts.device.type != "cuda":
            raise ConfigError(f"transport 'cuda' needs a CUDA device, got {opts.device}")
        self.device = opts.device
        self.stream = torch.cuda.Stream(device=self.device)
        # Per allocating stream, an event recorded after its latest `alloc` that the copy stream
        # has not waited on yet (see `alloc`). Slots are allocated once, at attach.
        self._alloc_fences: dict[torch.cuda.Stream, torch.cuda.Event] = {}
        self._alloc_lock = threading.Lock()
        self._sources_seen: set[int] = set()  # host buffers checked for page-locking
        self._warned_pageable = False

    def alloc(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        # PyTorch's caching allocator makes a block safe for the stream that allocated it only:
        # work queued there earlier may still use the memory. Copies into it run on our stream,
        # so the next copy waits until the allocating stream gets here.
        allocating = torch.cuda.current_stream(self.device)
        ev = torch.cuda.Event()
        ev.record(allocating)
        with self._alloc_lock:
            self._alloc_fences[allocating] = ev
        return buf

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence) -> Fence:
        if not self._warned_pageable:
            self._check_page_locked(src)
        with torch.cuda.stream(self.stream):
            if self._alloc_fences:
                with self._alloc_lock:
                    fences, self._alloc_fences = list(self._alloc_fences.values()), {}
                for ev in fences:  # once: every later copy queues behind this one
                    self.stream.wait_event(ev)
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return ready

    def _check_page_locked(self, src: torch.Tensor) -> None:
        """Warn once when a copy reads pageable memory: CUDA then stages it through a bounce
        buffer and the call returns only once the bytes are staged, so the copy no longer
        overlaps compute. Each host buffer is looked at once, until the warning is given."""
        ptr = src.data_ptr()
        if ptr in self._sources_seen:
            return
        self._sources_seen.add(ptr)
        if not src.is_pinned():
            self._warned_pageable = True
            self._sources_seen.clear()
            warnings.warn(
                "torus-sparse: transport 'cuda' is copying from pageable host memory (pin_memory=False, "
                "or page-locking failed), so every host→device copy is synchronous and nothing "
                "overlaps compute; leave pin_memory unset (or True) for overlapped copies",
                RuntimeWarning,
                stacklevel=3,
            )

    def compute_fence(self) -> Fence:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def wait(self, fence: Fence) -> float | PendingStall:
        if fence is None:
            return 0.0
        compute = torch.cuda.current_stream(self.device)
        if fence.query():
            compute.wait_event(fence)  # free: already complete, keeps the ordering explicit
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        compute.wait_event(fence)
        end.record(compute)
        return _CudaStall(start, end)

    def close(self) -> None:
        self.stream.synchronize()


class ZeroCopy:
    """CPU only: compute reads the packed host store in place; nothing is ever copied."""

    name = "zero-copy"
    zero_copy = True

    def __init__(self, opts: TransportOptions) -> None:
        if opts.device.type != "cpu":
            raise ConfigError(
                f"transport 'zero-copy' computes from host memory and needs device 'cpu', got {opts.device}; "
                f"use 'cuda' (or 'auto') on a GPU"
            )
        self.device = opts.device

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence) -> Fence:
        raise TransferError("the zero-copy transport never copies; this is an engine bug")

    def compute_fence(self) -> Fence:
        return None

    def wait(self, fence: Fence) -> float:
        return 0.0

    def close(self) -> None:
        pass


@hookimpl
def torus_register_transports(register) -> None:
    register("copy", CpuCopyWorker)
    register("cuda", CudaCopyStream)
    register("zero-copy", ZeroCopy)
    register("simulated-link", SimulatedLink)
