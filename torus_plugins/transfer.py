"""The transfer backend seam: the one primitive that differs between CUDA and the CPU.

The slot ring (`slots.py`) and the engine decide *what* is copied *where* and *when*; a transport
only knows how to copy bytes asynchronously and how to order that copy against compute. Fences
are opaque to the engine: a CUDA event, a future, or `None` for "already done".
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable, Protocol, runtime_checkable

import torch

Fence = Any  # transport-specific: None means "nothing to wait for"


class PendingStall(Protocol):
    """A stall measured on the device, read later so the hot path never synchronises."""

    def finished(self) -> bool: ...

    def seconds(self) -> float: ...


@runtime_checkable
class Transport(Protocol):
    """Moves packed layer bytes from the host store into device buffers.

    Contract, which the engine relies on:
    - `copy(dst, src, after)` starts copying `src` (host, uint8) into `dst` (device, uint8) no
      earlier than `after` (a fence from `compute_fence`) and returns a fence that completes when
      the bytes have landed. It must not block the caller on the copy itself.
    - `wait(fence)` makes subsequent compute observe the copy (CUDA: the compute stream waits on
      the event; CPU: the caller blocks). It raises `TransferError` if the copy failed or did not
      finish within the configured timeout. It returns the seconds the host blocked, or a
      `PendingStall` when the wait happens on the device.
    - `compute_fence()` marks "every kernel enqueued so far has finished reading its inputs".
    - `zero_copy` transports never copy: the engine binds weights to host memory directly.
    - `aliases_source` (optional, default False): the transport runs the full ring protocol
      (fences, slots, ordering) but compute reads the host store where the copy came from; the
      simulated link's time-only mode uses it to model a DMA engine that costs the CPU nothing.
    """

    name: str
    zero_copy: bool

    def alloc(self, nbytes: int) -> torch.Tensor: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Fence) -> Fence: ...

    def compute_fence(self) -> Fence: ...

    def wait(self, fence: Fence) -> float | PendingStall: ...

    def close(self) -> None: ...


#: What a plugin registers under a transport name: built for one attached model.
TransportFactory = Callable[["TransportOptions"], Transport]


class TransportOptions:
    """What a transport factory may read: the compute device, timeout and free-form plugin options."""

    def __init__(self, device: torch.device, timeout_s: float, options: dict[str, Any]) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self.options = options


# --------------------------------------------------------------------------- the CUDA runtime
#: The CUDA runtime library PyTorch loaded (a `ctypes.CDLL`), once found; `False`: not found.
_RUNTIME: Any = None


def cuda_runtime() -> Any:
    """The CUDA runtime (libcudart) of this process, through ctypes, or None without one.

    `torch.cuda.cudart()` binds only a few runtime calls (cudaHostRegister/Unregister, the
    profiler); `cudaGetLastError` is not among them. PyTorch has already loaded libcudart (its CUDA
    build links it), so the library is found among the process' mappings (or by name) and opened
    again: the same runtime, the same last-error state."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _open_cudart() or False
    return _RUNTIME or None


def _open_cudart() -> Any:
    candidates: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "libcudart" in line else ""
                if path.startswith("/") and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    found = ctypes.util.find_library("cudart")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.cudaGetLastError.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def clear_cuda_error() -> int:
    """Read and reset the CUDA runtime's last error (`cudaGetLastError`); 0 when there is none or
    no runtime. A failed runtime call (say `cudaHostRegister`) leaves its error there, and the next
    kernel launch's check would report it as its own failure: call this after such a call."""
    lib = cuda_runtime()
    return int(lib.cudaGetLastError()) if lib is not None else 0
