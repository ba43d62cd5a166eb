"""The device side of the GPU checks: sync and memory, the pinned link probe, random bf16 models.

Everything here also runs without CUDA (the checks' `--tiny` mode on a CPU): syncs and peaks are
no-ops or None there, and the link probe times a host memcpy instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .record import Run


# --------------------------------------------------------------------------- which device
def pick_device(tiny: bool, script: str) -> tuple[torch.device, str] | None:
    """(device, engine transport): CUDA with transport "cuda" when there is one; the CPU with
    "copy" for a `--tiny` smoke test; None (after saying why on stderr) for a full check without CUDA."""
    import sys

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), "cuda"
    if tiny:
        return torch.device("cpu"), "copy"
    print(
        f"{script}: CUDA is not available; the full check needs a GPU (use --tiny to smoke-test on the CPU)",
        file=sys.stderr,
    )
    return None


def device_record(device: torch.device) -> dict[str, Any]:
    """`device` (the GPU's name, or "cpu (<machine>)") and `device_memory_bytes` (None on a CPU)."""
    if device.type == "cuda":
        return {
            "device": torch.cuda.get_device_name(device),
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
        }
    return {"device": f"cpu ({platform.machine()})", "device_memory_bytes": None}


@dataclass(kw_only=True)
class DeviceCheck:
    """What every phase of a GPU check reads and writes: its flags, the device and engine transport,
    the report and the run that saves it (after every phase). Each check subclasses it with its own state."""

    args: argparse.Namespace
    device: torch.device
    transport: str
    run: Run
    report: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.run.save(self.report)


class Terminated(BaseException):
    """SIGTERM arrived (`timeout`, a lease ending): not an Exception, so no phase's error handler
    records it and goes on; `terminable` writes what was measured and the summary instead."""


@contextlib.contextmanager
def terminable(c: DeviceCheck, finish: Callable[[], None]) -> Iterator[None]:
    """Run a check's phases so that SIGTERM still leaves its summary: the signal raises
    `Terminated` in the main thread (between Python steps: a running kernel or copy ends first),
    the report records when, the phase it cut gets an "error" saying so (so summaries and tables
    treat it as a failed run, not a half-read one), `finish()` writes the summary and the table,
    and the script exits with 143 (128 + SIGTERM), as a killed process would."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the summary short
        at = round(c.run.elapsed(), 1)
        c.report["terminated"] = {"signal": "SIGTERM", "at_s": at}
        for e in c.report.get("phases", {}).values():  # the phase it cut: marked, not half-read
            if isinstance(e, dict) and not any(k in e for k in ("tok_per_s", "skipped", "error")):
                e["error"] = f"interrupted: SIGTERM at {at} s"
        print(f"SIGTERM after {c.run.elapsed():.0f} s: writing what was measured", flush=True)
        finish()
        raise SystemExit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- sync and memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    """Collect garbage, return cached device blocks and reset the peak, before the next phase."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def host_pinned_stats() -> dict[str, Any] | None:
    """Pinned host memory held by PyTorch's host allocator (None where unavailable)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        s = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - informational only
        return None
    keep = (
        "allocated_bytes.current",
        "allocated_bytes.peak",
        "active_bytes.current",
        "num_host_alloc",
        "host_alloc_time.total",
    )
    out = {k: v for k, v in s.items() if k in keep}
    return out or {k: v for k, v in s.items() if isinstance(v, (int, float))}


def empty_pinned_cache() -> bool:
    """Return cached pinned blocks to the driver (names differ across torch versions; best effort),
    so the pinned-memory figures read later show the engine's store, not the probe's buffer."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            try:
                fn()
                return True
            except Exception:  # noqa: BLE001 - informational only
                pass
    return False


# --------------------------------------------------------------------------- the link
def fill_random_bytes(buf: torch.Tensor, chunk: int = 2**20) -> None:
    """Random bytes, cheaply: one random 1 MiB block repeated (content does not change copy speed,
    but a non-constant pattern makes the spot check of the copied bytes meaningful)."""
    block = torch.randint(0, 256, (chunk,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    n = buf.numel() // chunk * chunk
    if n:
        buf[:n].view(-1, chunk).copy_(block.expand(n // chunk, chunk))
    if buf.numel() > n:
        buf[n:].copy_(block[: buf.numel() - n])


def _best_of(copy: Callable[[int], float], n: int, reps: int) -> dict[str, Any]:
    times = [copy(n) for _ in range(reps + 1)][1:]  # the first is a warm-up
    return {"bytes": n, "best_s": min(times), "GBps": n / min(times) / 1e9, "all_s": times}


def link_bandwidth(device: torch.device, sizes: dict[str, int], reps: int = 5) -> dict[str, Any]:
    """Best-of-`reps` host->device bandwidth per named size (CUDA: a pinned buffer copied with
    `non_blocking=True` on a side stream, timed with CUDA events on that stream; else a host memcpy)."""
    biggest = max(sizes.values())
    out: dict[str, Any] = {}
    if device.type != "cuda":
        src = torch.empty(biggest, dtype=torch.uint8)
        fill_random_bytes(src)
        dst = torch.empty_like(src)

        def host_copy(n: int) -> float:
            t0 = time.perf_counter()
            dst[:n].copy_(src[:n])
            return time.perf_counter() - t0

        for name, n in sizes.items():
            out[name] = {**_best_of(host_copy, n, reps), "verified": True}
        out["method"] = "no CUDA: host memcpy (Tensor.copy_), perf_counter, best of %d" % reps
        return out

    out.update(_pinned_probe(device, sizes, reps))  # its buffers are freed when it returns
    torch.cuda.synchronize(device)
    out["pinned_cache_emptied"] = empty_pinned_cache()
    return out


def _pinned_probe(device: torch.device, sizes: dict[str, int], reps: int) -> dict[str, Any]:
    host = torch.empty(max(sizes.values()), dtype=torch.uint8, pin_memory=True)
    fill_random_bytes(host)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)

    def pinned_copy(n: int) -> float:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            e0.record(stream)
            dev[:n].copy_(host[:n], non_blocking=True)
            e1.record(stream)
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3

    out: dict[str, Any] = {}
    for name, n in sizes.items():
        # The side stream's copies start after the compute stream's work on `dev`: what the caching
        # allocator's block may still have queued, and the previous size's check of the bytes.
        stream.wait_stream(torch.cuda.current_stream(device))
        entry = _best_of(pinned_copy, n, reps)
        head, tail = slice(0, 4096), slice(n - 4096, n)
        entry["verified"] = torch.equal(dev[head].cpu(), host[head]) and torch.equal(dev[tail].cpu(), host[tail])
        out[name] = entry
    out["method"] = "pinned host -> device, copy_(non_blocking=True) on a side stream, CUDA events, best of %d" % reps
    return out


def buffer_link(device: torch.device, host: torch.Tensor, reps: int = 3) -> dict[str, Any]:
    """Best-of-`reps` host->device bandwidth of one existing host buffer (uint8), e.g. a host store
    buffer the engine page-locked with cudaHostRegister: registered 4 KiB-page memory can DMA
    slower than the pinned allocator's block the link probe uses. A host memcpy without CUDA."""
    n = host.numel()
    if device.type != "cuda":
        dst = torch.empty_like(host)

        def host_copy(k: int) -> float:
            t0 = time.perf_counter()
            dst.copy_(host)
            return time.perf_counter() - t0

        return {**_best_of(host_copy, n, reps), "pinned": False, "method": "no CUDA: host memcpy"}
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))

    def copy(k: int) -> float:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            e0.record(stream)
            dev.copy_(host, non_blocking=True)
            e1.record(stream)
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3

    out = {**_best_of(copy, n, reps), "pinned": bool(host.is_pinned())}
    out["method"] = "one host store buffer -> device, copy_(non_blocking=True) on a side stream, CUDA events"
    return out


# --------------------------------------------------------------------------- models
def random_bf16(
    make: Callable[[], nn.Module], seed: int, std: float = 0.02, device: torch.device | None = None
) -> nn.Module:
    """`make()` under accelerate's `init_empty_weights` (parameters on `meta`, buffers real), then
    every parameter created directly in bf16 and left on the host: `normal_(0, std)` per matrix in
    module order from one generator seeded with `seed`, ones for 1-d weights (norms; the checked
    models have no biases). With a CUDA `device` the numbers are drawn there (a 7B model's 6.7 B
    normals take seconds on a GPU, 45-60 s on one CPU thread) and each matrix is copied to the host
    as it is made (device memory: one matrix). The same seed gives the same weights on the same
    kind of device; a CPU and a GPU draw different ones. No float32 copy, no transformers init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = make()
    where = device if device is not None and device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    for _, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if p.ndim == 1:
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=where).normal_(0.0, std, generator=gen)
                t = t.to("cpu") if where.type != "cpu" else t
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {name} was left on the meta device")
    model.config.dtype = torch.bfloat16
    model.eval()
    return model
