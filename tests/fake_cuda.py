"""A CPU emulation of `torch.cuda` (streams, events, page-locking, memory counters), so the real
`CudaCopyStream` and the real engine run on a machine with no GPU.

How it stands in for a GPU:

- The device is the CPU. Every tensor is a CPU tensor; a `TorchFunctionMode` maps the device
  "cuda" to the CPU wherever torch is asked for it (`torch.empty(..., device="cuda:0")`,
  `t.to("cuda")`, `t.cuda()`), so the engine is configured with device "cuda" and takes its CUDA
  code paths (pinned store, quantizing on the device, the CUDA transport, the memory counters).
  Memory allocated that way is "device memory": the fake tracks it by storage.
- `torch.cuda` itself is replaced only inside the project's modules: `patched()` rebinds their
  global name `torch` to a proxy whose `cuda` is this fake and whose every other attribute is the
  real torch. transformers and torch itself keep the real `torch.cuda` (no GPU), so the model
  computes on the CPU exactly as it does unwrapped: logits compare bit for bit.
- Each stream is a FIFO queue. Work enqueued on a side stream (a `copy_` issued under
  `torch.cuda.stream(s)`, caught by a `TorchDispatchMode` below autograd, so autograd and
  inference-mode checks run at issue as they do on CUDA) runs only when something needs it: a
  wait on or a query of an event recorded after it, or a synchronize. A copy really copies when
  it runs, reading its source then (a pageable source is staged at issue, as CUDA does).
- The compute stream (the default stream) runs compute synchronously, as the CPU must. Its
  queue only ever holds what allocation leaves behind (see below), and `wait_event` on it forces
  the awaited stream's queue up to that event at once: compute issued afterwards sees the copy.
- Newly allocated device memory is filled with 0xFF bytes (NaN in every float dtype), and the
  allocating stream's queue gets one more such fill: the caching allocator may hand out a block
  that work queued earlier on that stream still writes. The fill runs when the allocating stream
  is forced, or just before a compute op touches that memory. A copy on another stream that does
  not wait for the allocating stream can therefore be overwritten after it landed.
- Races are detected, not left to timing. Every stream keeps a vector clock (what it has waited
  for, through events, and what the host observed through queries and synchronizes); every
  access to device memory is checked against the last conflicting accesses of other streams. A
  copy that writes memory compute read without waiting for those reads (or compute that reads a
  copy it never waited for) is a data race on a GPU: the fake records it in `races` and fills the
  memory with 0xFF, so wrong logits or NaN follow, every run, instead of once in a while.
- Device time is a clock advanced by each copy (`bandwidth` bytes per second): events recorded
  with `enable_timing=True` report deterministic elapsed times.

Knobs: `query_completes` (True: a query finds the work done, running it if needed, as when the
copy engine kept up; False: a query reports queued work as still in flight, so the engine takes
its device-side stall path), `register_error` (a cudaError code `cudaHostRegister` returns, also
left as the runtime's last error, which the next kernel launch reports unless someone calls
`cudaGetLastError`, which the project reaches through libcudart (`transfer.cuda_runtime`, here
`_Runtime`): `torch.cuda.cudart()` has no binding for it, in the fake as on a GPU), `pinned_alloc_fails` (PyTorch's pinned allocator raises), `capturing`.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import pkgutil
import sys
import threading
import types
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")

#: cudaError codes the fake returns (the values of the CUDA runtime's enum)
CUDA_SUCCESS = 0
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713
_ERROR_NAMES = {
    CUDA_ERROR_MEMORY_ALLOCATION: "out of memory",
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: "part or all of the requested memory range is already mapped",
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED: "pointer does not correspond to a registered memory region",
}

_EMPTY_FACTORIES = {torch.empty, torch.empty_strided, torch.empty_like, torch.Tensor.new_empty}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
#: ops that neither read nor write tensor data although they are not views
_NO_DATA = {aten.is_pinned.default, aten.lift_fresh.default}

VectorClock = dict[int, int]


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


def _is_cpu(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _join(into: VectorClock, other: VectorClock) -> None:
    for k, v in other.items():
        if into.get(k, 0) < v:
            into[k] = v


@dataclass
class _Record:
    """One `Event.record`: its place in a stream's queue and what that stream had seen by then."""

    stream: "FakeStream"
    vc: VectorClock
    done: bool = False
    time: float = 0.0  # device clock (seconds) when it completed


@dataclass
class _Memory:
    """Bookkeeping of one device storage: its last accesses, for race detection."""

    nbytes: int
    stream: "FakeStream"  # the allocating stream
    storage: Callable[[], Any]  # weak reference to the storage
    last_write: tuple[int, int] | None = None  # (stream id, its clock)
    reads: dict[int, int] = field(default_factory=dict)  # stream id -> latest read clock since that write
    pending: int = 0  # allocation fills still queued on `stream`


class FakeStream:
    """`torch.cuda.Stream`: a FIFO queue of work that runs when something needs it."""

    _fake: "FakeCuda"

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = CUDA0
        self.priority = priority
        self.is_default = False
        self.id = self._fake._register_stream(self)
        self.vc: VectorClock = {self.id: 0}
        self._host_version = 0
        self._queue: deque[tuple[str, Any, VectorClock]] = deque()

    # --- torch.cuda.Stream's API
    def wait_event(self, event: "FakeEvent") -> None:
        self._fake._wait(self, event)

    def wait_stream(self, stream: "FakeStream") -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: "FakeEvent | None" = None) -> "FakeEvent":
        event = event if event is not None else self._fake.Event()
        event.record(self)
        return event

    def query(self) -> bool:
        fake = self._fake
        with fake._lock:
            if fake.query_completes:
                self._drain()
            if not self._queue:
                fake._observe(self.vc)
                return True
            return False

    def synchronize(self) -> None:
        fake = self._fake
        with fake._lock:
            self._drain()
            fake._observe(self.vc)

    def __repr__(self) -> str:
        return f"<FakeStream {'default' if self.is_default else self.id}, {len(self._queue)} queued>"

    # --- execution
    def _step(self) -> None:
        kind, payload, vc = self._queue.popleft()
        if kind == "op":
            payload(vc)
        elif kind == "record":
            payload.done, payload.time = True, self._fake.clock
        else:  # "wait"
            self._fake._force(payload)

    def _drain(self) -> None:
        while self._queue:
            self._step()


class FakeEvent:
    """`torch.cuda.Event`: completes when its stream's queue reaches it."""

    _fake: "FakeCuda"

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        self._rec: _Record | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        fake = self._fake
        stream = stream if stream is not None else fake.current_stream()
        with fake._lock:
            fake._sync_host(stream)
            rec = _Record(stream, dict(stream.vc))
            if stream._queue:
                stream._queue.append(("record", rec, rec.vc))
            else:  # an idle stream: complete at once, as CUDA does
                rec.done, rec.time = True, fake.clock
            self._rec = rec

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream if stream is not None else self._fake.current_stream()).wait_event(self)

    def query(self) -> bool:
        fake = self._fake
        rec = self._rec
        if rec is None:
            return True  # never recorded: CUDA reports it complete
        with fake._lock:
            if fake.query_completes:
                fake._force(rec)
            if rec.done:
                fake._observe(rec.vc)  # the host saw it finish: later work is ordered after it
            return rec.done

    def synchronize(self) -> None:
        fake = self._fake
        rec = self._rec
        if rec is None:
            return
        with fake._lock:
            fake._force(rec)
            fake._observe(rec.vc)

    def elapsed_time(self, end: "FakeEvent") -> float:
        """Milliseconds of device time between two completed timing events (CUDA's rules)."""
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._rec is None or end._rec is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self._rec.done and end._rec.done):
            raise RuntimeError("CUDA error: device not ready (both events must have completed)")
        return (end._rec.time - self._rec.time) * 1000.0


class _Cudart:
    """`torch.cuda.cudart()`: the runtime calls the project makes, with CUDA's error semantics."""

    def __init__(self, fake: "FakeCuda") -> None:
        self._fake = fake

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        fake = self._fake
        with fake._lock:
            fake.register_calls += 1
            if fake.register_error:
                return fake._fail(fake.register_error)
            if any(lo < ptr + size and ptr < lo + n for lo, n in fake.registered.items()):
                return fake._fail(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED)
            fake.registered[ptr] = size
            return CUDA_SUCCESS

    def cudaHostUnregister(self, ptr: int) -> int:
        fake = self._fake
        with fake._lock:
            size = fake.registered.pop(ptr, None)
            if size is None:
                return fake._fail(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)
            if any(ptr <= src < ptr + size for src in fake._inflight_sources.elements()):
                # The memory is about to go back to the allocator while the copy engine may still
                # read it: a use-after-free on a GPU.
                fake.races.append("host memory was unregistered while a queued copy still reads it")
            return CUDA_SUCCESS


class _Runtime:
    """libcudart as `transfer.cuda_runtime()` opens it (ctypes): the calls `torch.cuda.cudart()`
    does not bind. `patched()` puts it where the project looks for the runtime."""

    def __init__(self, fake: "FakeCuda") -> None:
        self._fake = fake

    def cudaGetLastError(self) -> int:
        fake = self._fake
        err, fake.last_error = fake.last_error, CUDA_SUCCESS
        return err

    def cudaPeekAtLastError(self) -> int:
        return self._fake.last_error


class _DeviceMode(TorchFunctionMode):
    """Maps the device "cuda" to the CPU and tracks what is allocated there."""

    def __init__(self, fake: "FakeCuda") -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        fake = self.fake
        if fake._bypassing():
            return func(*args, **kwargs)
        if func in _MOVES:
            return fake._move(func, args, kwargs)
        if func is torch.Tensor.is_pinned:
            return fake.is_pinned(args[0])
        if func is torch.Tensor.pin_memory:
            return fake._pinned_copy(args[0])
        if kwargs.get("pin_memory"):
            kwargs = {k: v for k, v in kwargs.items() if k != "pin_memory"}
            if fake.pinned_alloc_fails:
                raise RuntimeError("CUDA error: out of memory (emulated: the pinned host allocator refused)")
            out = func(*args, **kwargs)
            fake._mark_pinned(out)
            return out
        device = kwargs.get("device")
        if device is None and func in _EMPTY_FACTORIES and args and isinstance(args[0], torch.Tensor):
            # `empty_like(t)` / `t.new_empty(...)` allocate where `t` lives
            if fake.device_bytes(args[0]):
                device = CUDA0
        if device is None or not _is_cuda(device):
            return func(*args, **kwargs)
        kwargs = {**kwargs, "device": CPU}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        if func in _EMPTY_FACTORIES:
            fake._new_memory(out, fill_pending=True)
        else:
            fake._launch_check()  # a fill kernel
            fake._new_memory(out, fill_pending=False, poison=False)
        return out


class _StreamMode(TorchDispatchMode):
    """Below autograd: defers copies issued on side streams, checks every device-memory access."""

    def __init__(self, fake: "FakeCuda") -> None:
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        fake = self.fake
        if fake._bypassing() or func.is_view or func in _NO_DATA:
            return func(*args, **kwargs)
        stream = fake.current_stream()
        if func is aten.copy_.default and not stream.is_default:
            return fake._defer_copy(stream, args[0], args[1])
        accesses = fake._accesses(func, args, kwargs)
        if accesses:
            if not stream.is_default:
                raise NotImplementedError(
                    f"fake_cuda only models copies on side streams, not {func} (add it to tests/fake_cuda.py)"
                )
            fake._compute_access(stream, accesses, str(func))
        return func(*args, **kwargs)


class FakeCuda:
    """Stands in for the `torch.cuda` module (an instance per test: all state is its own)."""

    def __init__(
        self,
        *,
        query_completes: bool = True,
        bandwidth: float = 1e9,
        total_memory: int = 16 * 2**30,
    ) -> None:
        self.query_completes = query_completes
        self.bandwidth = bandwidth
        self.total_memory = total_memory
        self.register_error = CUDA_SUCCESS
        self.pinned_alloc_fails = False
        self.capturing = False
        #: the runtime's last error (what cudaGetLastError returns and clears)
        self.last_error = CUDA_SUCCESS
        #: page-locked host ranges: cudaHostRegister'ed (ptr -> bytes) and pinned-allocator ones
        self.registered: dict[int, int] = {}
        self.pinned: dict[int, int] = {}
        #: every data race found, as text (see the module docstring)
        self.races: list[str] = []
        #: counters tests read
        self.register_calls = 0
        self.copies_run = 0
        self.pageable_copies = 0
        self.host_to_device = 0  # blocking `.to("cuda")` transfers
        self.clock = 0.0  # device time, seconds
        self._lock = threading.RLock()
        self._local = threading.local()
        self._streams: list[FakeStream] = []
        self._memory: dict[int, _Memory] = {}
        self._allocated = 0
        self._peak = 0
        self._host_vc: VectorClock = {}
        self._host_version = 0
        self._access_specs: dict[Any, list[tuple[int, str, bool]]] = {}
        self._inflight_sources: collections.Counter[int] = collections.Counter()  # page-locked sources of queued copies
        self.Stream: type[FakeStream] = type("Stream", (FakeStream,), {"_fake": self})
        self.Event: type[FakeEvent] = type("Event", (FakeEvent,), {"_fake": self})
        self._default = self.Stream()
        self._default.is_default = True

    # ------------------------------------------------------------------ torch.cuda's API
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device: Any) -> None:
        pass

    def get_device_name(self, device: Any = None) -> str:
        return "fake CUDA device (CPU emulation, tests/fake_cuda.py)"

    def current_stream(self, device: Any = None) -> FakeStream:
        return getattr(self._local, "stream", None) or self._default

    def default_stream(self, device: Any = None) -> FakeStream:
        return self._default

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        """The current stream of this thread is `stream` inside the block (as CUDA's is per thread)."""
        if stream is None:
            yield
            return
        prev = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = prev

    def synchronize(self, device: Any = None) -> None:
        with self._lock:
            for s in self._streams:
                s._drain()
            for s in self._streams:
                self._observe(s.vc)

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    def cudart(self) -> _Cudart:
        return _Cudart(self)

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.total_memory - self._allocated, self.total_memory

    def memory_allocated(self, device: Any = None) -> int:
        return self._allocated

    def max_memory_allocated(self, device: Any = None) -> int:
        return self._peak

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._peak = self._allocated

    def empty_cache(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # Fail loudly on anything not emulated, rather than letting real torch.cuda answer.
        raise AttributeError(f"tests/fake_cuda.py does not emulate torch.cuda.{name}")

    # ------------------------------------------------------------------ set-up for tests
    @contextlib.contextmanager
    def activate(self) -> Iterator["FakeCuda"]:
        """Enter the fake on this thread (torch's modes are per thread: each thread enters it)."""
        with _DeviceMode(self), _StreamMode(self):
            yield self

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` run with the fake active on whatever thread calls it."""

        def run(*args: Any, **kwargs: Any) -> Any:
            with self.activate():
                return fn(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def patched(self) -> Iterator["FakeCuda"]:
        """The project's modules see this fake as `torch.cuda`; torch and transformers do not."""
        import torus_plugins

        # Plugins load lazily: import every project module now, so each one is swapped.
        for info in pkgutil.walk_packages(torus_plugins.__path__, "torus_plugins."):
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional module whose extras are missing: nothing imports it either
                continue
        from torus_plugins import transfer

        proxy = _TorchProxy(self)
        runtime, transfer._RUNTIME = transfer._RUNTIME, _Runtime(self)
        swapped = []
        for name, mod in list(sys.modules.items()):
            if name.split(".")[0] in ("torus_plugins", "torus_adapters") and getattr(mod, "torch", None) is torch:
                mod.torch = proxy  # type: ignore[attr-defined]
                swapped.append(mod)
        try:
            with self.activate():
                yield self
        finally:
            for mod in swapped:
                mod.torch = torch  # type: ignore[attr-defined]
            transfer._RUNTIME = runtime

    def is_pinned(self, t: torch.Tensor) -> bool:
        """Whether `t`'s memory is page-locked (registered or from the pinned allocator)."""
        if t.device.type != "cpu" or self._tracked(t) is not None:
            return False
        ptr = t.data_ptr()
        with self._lock:
            return any(lo <= ptr < lo + n for ranges in (self.registered, self.pinned) for lo, n in ranges.items())

    def device_bytes(self, t: torch.Tensor) -> bool:
        """Whether `t` lives in (fake) device memory."""
        return self._tracked(t) is not None

    # ------------------------------------------------------------------ streams and ordering
    def _register_stream(self, stream: FakeStream) -> int:
        with self._lock:
            self._streams.append(stream)
            return len(self._streams) - 1

    def _bypassing(self) -> bool:
        return getattr(self._local, "bypass", 0) > 0

    @contextlib.contextmanager
    def _bypass(self) -> Iterator[None]:
        """The fake's own tensor work: not intercepted, not tracked, below autograd."""
        self._local.bypass = getattr(self._local, "bypass", 0) + 1
        try:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                yield
        finally:
            self._local.bypass -= 1

    def _observe(self, vc: VectorClock) -> None:
        """The host saw work complete: everything it issues from now on is ordered after it."""
        before = dict(self._host_vc)
        _join(self._host_vc, vc)
        if self._host_vc != before:
            self._host_version += 1

    def _sync_host(self, stream: FakeStream) -> None:
        if stream._host_version != self._host_version:
            _join(stream.vc, self._host_vc)
            stream._host_version = self._host_version

    def _tick(self, stream: FakeStream) -> VectorClock:
        self._sync_host(stream)
        stream.vc[stream.id] += 1
        return dict(stream.vc)

    def _enqueue(self, stream: FakeStream, op: Callable[[VectorClock], None]) -> None:
        vc = self._tick(stream)
        stream._queue.append(("op", op, vc))

    def _force(self, rec: _Record) -> None:
        """Run `rec`'s stream up to `rec` (and, through its waits, whatever that needs)."""
        while not rec.done:
            rec.stream._step()

    def _wait(self, stream: FakeStream, event: FakeEvent) -> None:
        rec = event._rec
        if rec is None:
            return  # never recorded: nothing to wait for (CUDA semantics)
        with self._lock:
            if stream.is_default:
                # Compute runs on the host as it is issued: the compute stream's own earlier work is
                # done by now, and everything issued after this wait must see the awaited work.
                stream._drain()
                self._force(rec)
            elif not rec.done:
                stream._queue.append(("wait", rec, dict(stream.vc)))
            _join(stream.vc, rec.vc)

    # ------------------------------------------------------------------ memory
    def _tracked(self, t: torch.Tensor) -> _Memory | None:
        if not self._memory or t.device.type != "cpu":
            return None
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return self._memory.get(key)

    def _new_memory(self, t: torch.Tensor, fill_pending: bool, poison: bool = True) -> None:
        """Make `t`'s storage device memory; `poison`: uninitialised, so 0xFF (NaN) bytes."""
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = storage.data_ptr()
        stream = self.current_stream()
        with self._lock:
            if key in self._memory:
                return
            mem = self._memory[key] = _Memory(nbytes, stream, weakref.ref(storage))
            self._allocated += nbytes
            self._peak = max(self._peak, self._allocated)
            weakref.finalize(storage, self._free, key, nbytes)
            if poison:
                self._poison_storage(storage)
            if fill_pending:
                # Earlier work on the allocating stream may still write this block: model it as a
                # fill queued there (see the module docstring).
                mem.pending += 1

                def fill(vc: VectorClock) -> None:
                    mem.pending -= 1
                    self._check(mem, stream.id, vc, True, "the allocator's pending reuse of a block")
                    self._poison_memory(mem)

                self._enqueue(stream, fill)

    def _free(self, key: int, nbytes: int) -> None:
        with self._lock:
            if self._memory.pop(key, None) is not None:
                self._allocated -= nbytes

    def _poison(self, t: torch.Tensor) -> None:
        self._poison_storage(t.untyped_storage())

    def _poison_storage(self, storage: Any) -> None:
        """0xFF over every byte: NaN in every float dtype."""
        with self._bypass():
            torch.empty(0, dtype=torch.uint8).set_(storage).fill_(0xFF)

    def _mark_pinned(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return
        key = storage.data_ptr()
        with self._lock:
            self.pinned[key] = storage.nbytes()
        weakref.finalize(storage, self.pinned.pop, key, None)

    def _pinned_copy(self, t: torch.Tensor) -> torch.Tensor:
        if self.pinned_alloc_fails:
            raise RuntimeError("CUDA error: out of memory (emulated: the pinned host allocator refused)")
        with self._bypass():
            out = t.clone()
        self._mark_pinned(out)
        return out

    def _move(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """`t.to(...)`, `t.cuda()`, `t.cpu()`: "cuda" is the CPU, but a move still copies."""
        t, rest = args[0], list(args[1:])
        to_cuda = to_cpu = False
        if func is torch.Tensor.cuda:
            to_cuda = True
            func, rest, kwargs = torch.Tensor.to, [CPU], {k: v for k, v in kwargs.items() if k != "device"}
        elif func is torch.Tensor.cpu:
            to_cpu = True
        else:
            if "device" in kwargs:
                to_cuda, to_cpu = _is_cuda(kwargs["device"]), _is_cpu(kwargs["device"])
                if to_cuda:
                    kwargs = {**kwargs, "device": CPU}
            elif rest and isinstance(rest[0], (torch.device, str)):
                to_cuda, to_cpu = _is_cuda(rest[0]), _is_cpu(rest[0])
                if to_cuda:
                    rest[0] = CPU
        src = self._tracked(t)
        if to_cuda:
            self._launch_check()
        out = func(t, *rest, **kwargs)
        if to_cuda:
            if src is None:
                self.host_to_device += 1
                if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    out = out.clone()  # host and device memory are distinct
            self._new_memory(out, fill_pending=False, poison=False)
        elif to_cpu and src is not None and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            out = out.clone()  # a device→host copy (a compute-stream read, checked by the stream mode)
        return out

    # ------------------------------------------------------------------ accesses and races
    def _accesses(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[_Memory, bool]]:
        """The device memories an op touches, each with whether it writes it (from the op's schema)."""
        if not self._memory:
            return []
        specs = self._access_specs.get(func)
        if specs is None:
            specs = self._access_specs[func] = [
                (i, a.name, a.alias_info is not None and a.alias_info.is_write)
                for i, a in enumerate(func._schema.arguments)
            ]
        out: list[tuple[_Memory, bool]] = []
        for i, name, write in specs:
            value = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(value, torch.Tensor):
                values: Any = (value,)
            elif isinstance(value, (list, tuple)):
                values = value
            else:
                continue
            for v in values:
                if isinstance(v, torch.Tensor):
                    mem = self._tracked(v)
                    if mem is not None:
                        out.append((mem, write))
        return out

    def _check(self, mem: _Memory, sid: int, vc: VectorClock, write: bool, what: str) -> bool:
        """Record an access; True (and a race noted) when it conflicts with an unordered one."""
        race = None
        lw = mem.last_write
        if lw is not None and lw[0] != sid and lw[1] > vc.get(lw[0], 0):
            verb = "writes" if write else "reads"
            race = f"{what} on stream {sid} {verb} memory that stream {lw[0]} wrote, without waiting for the write"
        if write:
            for other, clock in mem.reads.items():
                if other != sid and clock > vc.get(other, 0):
                    race = f"{what} on stream {sid} writes memory that stream {other} read, without waiting for it"
            mem.reads = {}
            mem.last_write = (sid, vc[sid])
        else:
            mem.reads[sid] = max(mem.reads.get(sid, 0), vc[sid])
        if race is not None:
            self.races.append(race)
        return race is not None

    def _compute_access(self, stream: FakeStream, accesses: list[tuple[_Memory, bool]], what: str) -> None:
        with self._lock:
            self._launch_check()
            if any(m.pending and m.stream is stream for m, _ in accesses):
                stream._drain()  # this stream's earlier work on that memory comes first
            vc = self._tick(stream)
            poisoned = set()
            for mem, write in accesses:
                if self._check(mem, stream.id, vc, write, what) and id(mem) not in poisoned:
                    poisoned.add(id(mem))
                    self._poison_memory(mem)

    def _poison_memory(self, mem: _Memory) -> None:
        storage = mem.storage()
        if storage is not None:
            self._poison_storage(storage)

    def _defer_copy(self, stream: FakeStream, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """`dst.copy_(src)` on a side stream: queued, run when forced."""
        with self._lock:
            self._launch_check()
            dst_mem, src_mem = self._tracked(dst), self._tracked(src)
            staged = src
            if src_mem is None and not self.is_pinned(src):
                # A pageable source: CUDA stages it before the call returns (the copy is synchronous
                # for the host), so later host writes to it do not reach the device.
                with self._bypass():
                    staged = src.clone()
                self.pageable_copies += 1
            registered_at_issue = src_mem is None and self.is_pinned(src)
            if registered_at_issue:
                self._inflight_sources[src.data_ptr()] += 1

            def run(vc: VectorClock) -> None:
                raced = False
                if registered_at_issue:
                    self._inflight_sources[src.data_ptr()] -= 1
                if src_mem is not None:
                    raced |= self._check(src_mem, stream.id, vc, False, "a copy")
                if registered_at_issue and not self.is_pinned(src):
                    self.races.append("a copy ran after its page-locked source was unregistered (freed?)")
                with self._bypass():
                    dst.copy_(staged)
                self.copies_run += 1
                self.clock += dst.numel() * dst.element_size() / self.bandwidth
                if dst_mem is not None and self._check(dst_mem, stream.id, vc, True, "a copy"):
                    raced = True
                if raced:
                    self._poison(dst)  # a racing copy leaves undefined bytes

            self._enqueue(stream, run)
        return dst

    def _launch_check(self) -> None:
        """A kernel launch reports (and clears) the runtime's last error, as PyTorch's check does."""
        err = self.last_error
        if err:
            self.last_error = CUDA_SUCCESS
            raise RuntimeError(
                f"CUDA error: {_ERROR_NAMES.get(err, 'unknown error')} (cudaError {err}, left by an earlier "
                f"failed runtime call and reported by this launch; emulated by tests/fake_cuda.py)"
            )

    def _fail(self, err: int) -> int:
        self.last_error = err
        return err


class _TorchProxy(types.ModuleType):
    """The `torch` module with `cuda` replaced (what `patched()` gives the project's modules)."""

    def __init__(self, cuda: FakeCuda) -> None:
        super().__init__("torch")
        self.cuda = cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)
