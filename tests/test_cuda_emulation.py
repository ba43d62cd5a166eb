"""The real CUDA transport (`CudaCopyStream`), page-locking, device-side stall timing and
quantizing on the device, run on the CPU against the `torch.cuda` emulation in `fake_cuda.py`.

The emulation is adversarial where a GPU is merely usually kind: queued copies run only when
something waits for them, new device memory is NaN, and every access to device memory is checked
for a data race against the other streams. So "logits equal the unwrapped model, bit for bit, and
no race" means the engine's ordering is right, not that the timing was lucky; and the tests that
drop one wait of the real class show the emulation turns each missing wait into NaN or wrong
logits.
"""

from __future__ import annotations

import gc
import threading
import warnings
from typing import Any, Iterator

import pluggy
import pytest
import torch
from conftest import build_tiny, load_smollm2
from fake_cuda import CUDA_ERROR_MEMORY_ALLOCATION, FakeCuda

import torus_plugins as tp
from torus_plugins import transfer
from torus_plugins.builtin.transports import CudaCopyStream, _CudaStall
from torus_plugins.host_store import HostStore
from torus_plugins.plugins import build_plugin_manager
from torus_plugins.transfer import TransportOptions

PROMPT = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 22, 71, 14, 33, 2]])
OTHER_PROMPT = torch.tensor([[61, 2, 44, 19, 7, 90, 33, 12]])
NEW_TOKENS = 5
CUDA = torch.device("cuda", 0)
MOE = ("mixtral", "qwen2_moe")
HALF_THE_EXPERTS = 16  # the tiny MoE models have 4 MoE layers of 8 experts


@pytest.fixture
def fake() -> Iterator[FakeCuda]:
    # One intra-op thread: these models are far too small to split, and on a couple of shared
    # cores OpenMP's spinning workers cost more than the emulation itself. References are computed
    # here too, so every comparison runs with the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cuda = FakeCuda()
    try:
        with cuda.patched():
            yield cuda
            # A test that failed half-way leaves a model attached: let its finalizer (which drains
            # the transport and unregisters host memory) run while the emulation still stands in.
            gc.collect()
    finally:
        torch.set_num_threads(threads)


def run(model: torch.nn.Module, prompt: torch.Tensor = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(prompt).logits
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens


def tiny(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    return build_tiny(arch).to(dtype)


_REFS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def reference(
    arch: str, dtype: torch.dtype, quant: str | None, prompt: torch.Tensor = PROMPT
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model computes with no GPU emulation: unwrapped, or with `quant` every weight
    resident on the CPU (dequantized once; the same bytes the streamed slots dequantize)."""
    key = (arch, dtype, quant, tuple(prompt.flatten().tolist()))
    if key not in _REFS:
        model = tiny(arch, dtype)
        if quant is None:
            _REFS[key] = run(model, prompt)
        else:
            tp.attach(model, transport="copy", device="cpu", weight_quant=quant, moe_cache_experts=32)
            try:
                _REFS[key] = run(model, prompt)
            finally:
                tp.detach(model)
    return _REFS[key]


def attach_cuda(model: torch.nn.Module, pm: pluggy.PluginManager | None = None, **kw: Any) -> tp.Engine:
    """Every FFN layer streamed through the CUDA transport; half the experts cached."""
    kw.setdefault("transport", "cuda")
    kw.setdefault("resident_layers", 0)
    if any(arch in type(model).__name__.lower() for arch in ("mixtral", "qwen2moe")):
        kw.setdefault("moe_cache_experts", HALF_THE_EXPERTS)
    return tp.attach(model, device="cuda", plugin_manager=pm, **kw)


# (arch, dtype, weight_quant, lookahead, query_completes): every axis covered without the product
MATRIX = [
    ("llama", torch.float32, None, 1, True),
    ("llama", torch.float32, None, 3, False),
    ("llama", torch.bfloat16, None, 2, True),
    ("llama", torch.float32, "int8", 2, False),
    ("llama", torch.bfloat16, "int8", 3, True),
    ("llama", torch.float32, "int4", 1, False),
    ("llama", torch.bfloat16, "int4", 2, True),
    ("mixtral", torch.float32, None, 2, True),
    ("mixtral", torch.bfloat16, "int8", 1, False),
    ("mixtral", torch.float32, "int4", 3, True),
    ("qwen2_moe", torch.bfloat16, None, 3, False),
    ("qwen2_moe", torch.float32, "int8", 1, True),
]


@pytest.mark.parametrize(("arch", "dtype", "quant", "lookahead", "query_completes"), MATRIX)
def test_cuda_transport_equals_unwrapped_model(
    fake: FakeCuda, arch: str, dtype: torch.dtype, quant: str | None, lookahead: int, query_completes: bool
) -> None:
    ref_logits, ref_tokens = reference(arch, dtype, quant)
    fake.query_completes = query_completes
    model = tiny(arch, dtype)
    engine = attach_cuda(model, weight_quant=quant, lookahead=lookahead)
    assert type(engine.transport) is CudaCopyStream
    assert engine.store.pin_memory and fake.registered  # the store is page-locked in place
    logits, tokens = run(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert fake.races == []
    assert fake.copies_run > 0 and fake.pageable_copies == 0
    st = engine.stats()
    assert st.bytes_moved > 0 and st.peak_device_bytes == fake.max_memory_allocated() > 0
    if arch in MOE:
        assert st.experts is not None and st.experts.misses > 0  # experts were evicted and reloaded
    if not query_completes:
        # Every copy was still in flight when compute asked: the compute stream waited on the
        # device and the stall was timed with events (the emulated clock makes it > 0).
        assert st.stall_s > 0
    else:
        assert st.stall_s == 0.0
    tp.detach(model)
    assert fake.registered == {}  # every page-locked buffer was unregistered
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)


def test_smollm2_streams_every_layer_through_the_cuda_transport(fake: FakeCuda, smollm2_path: str) -> None:
    """The real default model: 30 FFN layers of real shapes rotate through a ring of three."""
    model = load_smollm2(smollm2_path)
    ref_logits, ref_tokens = run(model)
    engine = attach_cuda(model, lookahead=2)
    logits, tokens = run(model)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert engine.stats().streamed_layers == 30 and fake.races == []
    tp.detach(model)


def test_small_budget_streams_every_layer_within_it(fake: FakeCuda) -> None:
    model = tiny("llama", torch.float32)
    probe = attach_cuda(model, kv_reserve_tokens=0, lookahead=1)
    budget = probe.non_ffn_bytes + probe.plan.ring_bytes + 1024  # room for the ring, not one layer more
    tp.detach(model)
    fake.reset_peak_memory_stats()
    engine = attach_cuda(model, kv_reserve_tokens=0, resident_layers=None, vram_budget=budget, lookahead=1)
    logits, tokens = run(model)
    ref_logits, ref_tokens = reference("llama", torch.float32, None)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    st = engine.stats()
    assert st.streamed_layers == 4 and st.resident_layers == 0
    assert 0 < st.peak_device_bytes <= budget
    assert fake.races == []
    tp.detach(model)


# ---------------------------------------------------------------------- the emulation itself
def _transport() -> CudaCopyStream:
    return CudaCopyStream(TransportOptions(CUDA, 30.0, {}))


def _pinned(n: int, fill: int) -> torch.Tensor:
    t = torch.full((n,), fill, dtype=torch.uint8)
    return t.pin_memory()


def test_queued_copy_runs_only_when_waited_for(fake: FakeCuda) -> None:
    tr = _transport()
    dst = tr.alloc(4096)
    src = _pinned(4096, 7)
    ready = tr.copy(dst, src, tr.compute_fence())
    # Nothing forced it yet: the slot still holds what new device memory holds.
    with fake._bypass():
        assert bool((dst == 0xFF).all()) and fake.copies_run == 0
    assert tr.wait(ready) == 0.0  # a query finds it done (running it), then the compute stream waits
    assert torch.equal(dst, src) and fake.copies_run == 1
    assert fake.races == []
    tr.close()


def test_device_side_stall_is_timed_with_events(fake: FakeCuda) -> None:
    fake.query_completes = False  # the copy engine is behind: a query finds the copy in flight
    tr = _transport()
    dst = tr.alloc(1 << 20)
    ready = tr.copy(dst, _pinned(1 << 20, 3), None)
    assert not ready.query()
    stall = tr.wait(ready)
    assert isinstance(stall, _CudaStall)
    assert stall.finished()
    # The emulated device clock advances by bytes / bandwidth per copy: deterministic, not timed.
    assert stall.seconds() == pytest.approx((1 << 20) / fake.bandwidth)
    assert bool((dst == 3).all()) and ready.query()
    assert fake.races == []
    tr.close()


def test_first_copy_into_a_new_slot_waits_for_the_allocating_stream(fake: FakeCuda) -> None:
    """Issue item 9: the allocator's block may still be written by earlier work on the compute
    stream (emulated as a NaN fill queued there); the first copy must queue behind it."""
    for transport, broken in ((_transport(), False), (_PreFixAlloc(TransportOptions(CUDA, 30.0, {})), True)):
        fake.races.clear()
        dst = transport.alloc(4096)
        src = _pinned(4096, 9)
        transport.wait(transport.copy(dst, src, None))  # the copy runs first...
        landed = dst.clone()  # ...then compute reads the slot (draining the compute stream's fill)
        if broken:
            assert bool((landed == 0xFF).all()) and fake.races
        else:
            assert torch.equal(landed, src) and fake.races == []
        transport.close()


def test_a_failed_registration_is_sticky_until_cleared(fake: FakeCuda) -> None:
    """The runtime behaviour item 8 is about: the next kernel launch reports the earlier error."""
    fake.register_error = CUDA_ERROR_MEMORY_ALLOCATION
    buf = torch.empty(64, dtype=torch.uint8)
    assert fake.cudart().cudaHostRegister(buf.data_ptr(), 64, 0) == CUDA_ERROR_MEMORY_ALLOCATION
    with pytest.raises(RuntimeError, match="cudaError 2"):
        torch.zeros(4, device="cuda")
    torch.zeros(4, device="cuda")  # the launch that reported it also cleared it
    fake.cudart().cudaHostRegister(buf.data_ptr(), 64, 0)
    assert transfer.clear_cuda_error() == CUDA_ERROR_MEMORY_ALLOCATION
    torch.zeros(4, device="cuda")


def test_last_error_is_cleared_through_the_runtime_library(fake: FakeCuda) -> None:
    """`_page_lock` clears a failed registration's error through libcudart (ctypes), since
    `torch.cuda.cudart()` binds no cudaGetLastError; the emulation's runtime stands in for it."""
    from torus_plugins.host_store import _page_lock

    fake.register_error = CUDA_ERROR_MEMORY_ALLOCATION
    buf = torch.empty(64, dtype=torch.uint8)
    assert _page_lock(buf) == CUDA_ERROR_MEMORY_ALLOCATION
    assert fake.last_error == 0
    torch.zeros(4, device="cuda")  # no stale error reported by the next launch


def test_clear_cuda_error_calls_the_real_runtime_or_nothing() -> None:
    """With no emulation, `clear_cuda_error` calls libcudart's cudaGetLastError through ctypes
    when the process can open one (on a machine without a GPU it reports a driver error code, an
    int, never an AttributeError), and is a no-op returning 0 when there is no runtime at all."""
    saved = transfer._RUNTIME
    try:
        transfer._RUNTIME = None  # look it up afresh
        lib = transfer.cuda_runtime()
        code = transfer.clear_cuda_error()
        assert isinstance(code, int)
        if lib is None:
            assert code == 0
        transfer._RUNTIME = False  # none found
        assert transfer.cuda_runtime() is None and transfer.clear_cuda_error() == 0
    finally:
        transfer._RUNTIME = saved


# ---------------------------------------------------------------------- dropping each wait
class _NoComputeWait(CudaCopyStream):
    """Compute never waits for a copy's ready event (nor asks whether it landed)."""

    name = "cuda-no-compute-wait"

    def wait(self, fence: Any) -> float:
        return 0.0


class _NoFreeFenceWait(CudaCopyStream):
    """The copy stream never waits for the slot's previous readers (its free fence)."""

    name = "cuda-no-free-wait"

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        return super().copy(dst, src, None)


class _PreFixAlloc(CudaCopyStream):
    """Slots allocated as before issue item 9: no event for the copy stream to wait on."""

    name = "cuda-prefix-alloc"

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)


class _Register:
    def __init__(self, cls: type) -> None:
        self.cls = cls

    @tp.hookimpl
    def torus_register_transports(self, register: Any) -> None:
        register(self.cls.name, self.cls)


@pytest.mark.parametrize("query_completes", [True, False], ids=["copy-done-at-query", "copy-in-flight"])
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("broken", [_NoComputeWait, _NoFreeFenceWait, _PreFixAlloc], ids=lambda c: c.name)
def test_dropping_one_wait_gives_wrong_logits(fake: FakeCuda, broken: type, arch: str, query_completes: bool) -> None:
    ref_logits, _ = reference(arch, torch.float32, None)
    fake.query_completes = query_completes
    pm = build_plugin_manager(autoload=False)
    pm.register(_Register(broken))
    model = tiny(arch, torch.float32)
    engine = attach_cuda(model, pm, transport=broken.name, lookahead=1)
    assert isinstance(engine.transport, CudaCopyStream)
    with torch.no_grad():
        logits = torch.cat([model(PROMPT).logits, model(OTHER_PROMPT).logits], dim=1)
    assert logits.isnan().any() or not torch.equal(logits[:, : PROMPT.shape[1]], ref_logits)
    tp.detach(model)  # drains the copy stream: a copy nobody waited for runs now, and races
    assert fake.races  # found as a race too, not only through its effect


# ---------------------------------------------------------------------- item 8: page-locking failures
def _messages(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def test_failed_registration_falls_back_and_clears_the_error(fake: FakeCuda) -> None:
    fake.register_error = CUDA_ERROR_MEMORY_ALLOCATION
    model = tiny("llama", torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = attach_cuda(model, pin_memory=True)  # before the fix: the next launch raised
        logits, tokens = run(model)
    assert fake.last_error == 0
    assert len(_messages(record, "page-locking the host store failed")) == 1  # once, not per layer
    assert _messages(record, "rounds each buffer")  # fell back to PyTorch's pinned allocator
    assert not _messages(record, "synchronous")  # the pinned allocator's memory is page-locked
    ref_logits, ref_tokens = reference("llama", torch.float32, None)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert fake.registered == {} and fake.pageable_copies == 0 and fake.races == []
    assert engine.stats().bytes_moved > 0
    tp.detach(model)


def test_when_pinning_fails_entirely_the_store_is_pageable_and_says_so(fake: FakeCuda) -> None:
    fake.register_error = CUDA_ERROR_MEMORY_ALLOCATION
    fake.pinned_alloc_fails = True
    model = tiny("mixtral", torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attach_cuda(model, pin_memory=True)
        logits, tokens = run(model)
    assert fake.last_error == 0
    fallback = _messages(record, "page-locking the host store failed")
    assert len(fallback) == 1 and "pageable" in fallback[0]  # 32 experts, one store, one warning
    assert len(_messages(record, "synchronous")) >= 1
    ref_logits, ref_tokens = reference("mixtral", torch.float32, None)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    fake.synchronize()
    assert fake.pageable_copies == fake.copies_run > 0 and fake.races == []
    tp.detach(model)


def test_unpinned_store_with_cuda_transport_warns_once(fake: FakeCuda) -> None:
    model = tiny("llama", torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attach_cuda(model, pin_memory=False)
        logits, tokens = run(model)
    assert fake.register_calls == 0
    assert len(_messages(record, "synchronous")) == 1  # dozens of copies, one warning
    fake.synchronize()  # the prefetches for a next pass, still queued
    assert fake.pageable_copies == fake.copies_run > 0
    ref_logits, ref_tokens = reference("llama", torch.float32, None)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    tp.detach(model)


def test_pinned_store_does_not_warn(fake: FakeCuda) -> None:
    model = tiny("llama", torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attach_cuda(model)
        run(model)
    assert not _messages(record, "synchronous") and not _messages(record, "page-locking")
    tp.detach(model)


# ---------------------------------------------------------------------- quantizing on the device
def test_host_store_quantizes_on_the_device(fake: FakeCuda) -> None:
    torch.manual_seed(0)
    tensors = [("w1", torch.randn(48, 64)), ("b", torch.randn(48)), ("w2", torch.randn(64, 48))]
    on_cpu = HostStore(pin_memory=False, quant="int4", group_size=16)
    packed, cpu_buf = on_cpu.add_layer(tensors)
    moved = fake.host_to_device
    on_gpu = HostStore(pin_memory=True, quant="int4", group_size=16, quantize_device=CUDA)
    _, gpu_buf = on_gpu.add_layer(tensors)
    assert fake.host_to_device - moved == 2  # each eligible weight went to the device (the bias did not)
    assert not fake.device_bytes(gpu_buf) and gpu_buf.is_pinned()  # the result lives in the host store
    assert packed.quantized
    for a, b in zip(packed.transfer.views(gpu_buf), packed.transfer.views(cpu_buf)):
        assert torch.equal(a, b)  # the same codes and scales as quantizing on the CPU
    on_gpu.close()
    assert fake.registered == {}


# ---------------------------------------------------------------------- the lead's items, on the CUDA path
def test_model_collected_while_attached_drains_copies_before_unregistering(fake: FakeCuda) -> None:
    """Issue item 10: the prefetches queued at the end of a pass still read the page-locked
    store; the finalizer must let them finish before the store is unregistered and freed."""
    model = tiny("llama", torch.float32)
    attach_cuda(model, lookahead=2)
    run(model)
    assert sum(fake._inflight_sources.values()) > 0  # the next pass's prefetches are queued
    del model
    gc.collect()
    assert fake.registered == {} and fake.races == []


def test_streamed_layer_refuses_cuda_graph_capture(fake: FakeCuda) -> None:
    """Issue item 7: a captured graph would replay reads of whatever a slot holds later."""
    model = tiny("llama", torch.float32)
    attach_cuda(model)
    fake.capturing = True
    with pytest.raises(tp.IncompatibleModelError, match="CUDA graph"), torch.no_grad():
        model(PROMPT)
    fake.capturing = False
    logits, _ = run(model)
    assert torch.equal(logits, reference("llama", torch.float32, None)[0])
    tp.detach(model)


# ---------------------------------------------------------------------- how people call it (issue items 1, 3)
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_inference_mode_no_grad_and_grad_calls_alternate(fake: FakeCuda, arch: str) -> None:
    ref_logits, ref_tokens = reference(arch, torch.float32, "int8")
    model = tiny(arch, torch.float32)
    with torch.inference_mode():
        attach_cuda(model, weight_quant="int8", lookahead=2)  # attach itself inside inference mode
    for i in range(2):
        with torch.inference_mode():
            assert torch.equal(model(PROMPT).logits, ref_logits), f"inference mode, round {i}"
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            assert torch.equal(tokens, ref_tokens)
        logits, tokens = run(model)  # no_grad
        assert torch.equal(logits, ref_logits), f"no_grad, round {i}"
        assert torch.equal(tokens, ref_tokens)
        out = model(PROMPT).logits  # grad enabled
        assert torch.equal(out.detach(), ref_logits), f"grad enabled, round {i}"
    assert fake.races == []
    tp.detach(model)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_two_threads_on_one_model_each_get_their_own_answer(fake: FakeCuda, arch: str) -> None:
    prompts = [PROMPT, OTHER_PROMPT]
    refs = [reference(arch, torch.float32, None, p) for p in prompts]
    model = tiny(arch, torch.float32)
    engine = attach_cuda(model, lookahead=2)
    results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(k: int) -> None:
        try:
            start.wait(timeout=10)
            for _ in range(3):
                results[k].append(run(model, prompts[k]))
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=fake.wrap(worker), args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for k in range(2):
        assert len(results[k]) == 3
        for logits, tokens in results[k]:
            assert torch.equal(logits, refs[k][0]), f"thread {k}: logits differ from a call alone"
            assert torch.equal(tokens, refs[k][1]), f"thread {k}: tokens differ from a call alone"
    assert fake.races == []
    st = engine.stats()
    if st.experts is not None:
        for layer in st.experts.layers:
            assert layer.hits + layer.misses == layer.routed
    else:
        assert st.forward_passes == 2 * 3 * (1 + NEW_TOKENS)  # one forward, then one per new token
    tp.detach(model)


@pytest.mark.parametrize(
    ("arch", "dtype", "quant"),
    [("llama", torch.float32, None), ("llama", torch.float32, "int8"), ("mixtral", torch.float32, None)],
)
def test_host_placement_through_the_cuda_transport(
    fake: FakeCuda, arch: str, dtype: torch.dtype, quant: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host placement on a "GPU": split layers' device shares and cached experts go through the
    real CUDA copy stream (the race detector watching) while host shares compute on the host; the
    prefill streams, so its logits are bit-equal; greedy tokens equal the reference. A dense host
    layer's hidden states cross through the staging buffers: one event wait per host call; host
    experts none; and no blocking `.to("cuda")` either way."""
    from torus_plugins.host_compute import staging

    waits: list[Any] = []
    named = staging.wait_host
    monkeypatch.setattr(staging, "wait_host", lambda event: (waits.append(event), named(event)))
    ref_logits, ref_tokens = reference(arch, dtype, quant)
    model = tiny(arch, dtype)
    engine = attach_cuda(
        model, weight_quant=quant, host_compute="auto", host_share=0.5, host_max_tokens=1, host_kernel="packed"
    )
    assert type(engine.transport) is CudaCopyStream
    assert torch.get_num_threads() == 1  # all cores but one on CUDA (this machine: 2)
    waits.clear()
    moves = fake.host_to_device
    logits, tokens = run(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert fake.races == []
    st = engine.stats()
    assert st.host_calls > 0
    if arch == "llama":
        assert len(waits) == st.host_calls and all(w is not None for w in waits)
    else:  # host experts wait for nothing of their own: the ids read completes their staged inputs
        assert waits == []
    assert fake.host_to_device == moves, "a host result went back with a blocking copy"
    tp.detach(model)
    assert fake.registered == {}


@pytest.mark.parametrize("query_completes", [True, False])
def test_staging_crosses_with_one_event_wait_and_pinned_buffers(
    fake: FakeCuda, query_completes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Staging.to_host`: a non_blocking copy into a page-locked buffer and one event wait;
    `to_device`: page-locked source, non_blocking copy, no wait at all. Buffers are reused across
    layers (the next `to_host` has ordered the previous copy back), values stay right, no race."""
    from torus_plugins.host_compute import staging

    fake.query_completes = query_completes
    waits: list[Any] = []
    named = staging.wait_host
    monkeypatch.setattr(staging, "wait_host", lambda event: (waits.append(event), named(event)))
    s = staging.Staging(CUDA)
    moves = fake.host_to_device
    outs, ptrs = [], set()
    for k in range(3):
        x = torch.full((2, 8), float(k), device="cuda") + torch.arange(8, device="cuda")
        xh = s.to_host(x)
        assert len(waits) == k + 1 and waits[-1] is not None
        assert fake.is_pinned(xh) and not fake.device_bytes(xh)
        assert torch.equal(xh, torch.full((2, 8), float(k)) + torch.arange(8))
        ptrs.add(xh.data_ptr())
        y = s.to_device(xh * 2)
        assert fake.device_bytes(y) and len(waits) == k + 1
        outs.append(y)
    assert len(ptrs) == 1  # one input buffer, reused
    for k, y in enumerate(outs):  # each result kept its values after the buffer was reused
        assert torch.equal(y, 2 * (torch.full((2, 8), float(k)) + torch.arange(8)))
    # An MoE layer's host experts: inputs staged without a wait (the ids read syncs), and two
    # tensors sent back in one layer through distinct page-locked buffers.
    x = torch.arange(6, dtype=torch.float32, device="cuda").view(2, 3)
    hidden_h, weights_h = s.stage(x, x * 3)
    assert len(waits) == 3
    fake.synchronize()  # what `.tolist()` of the routed ids does on the compute stream
    assert fake.is_pinned(hidden_h) and fake.is_pinned(weights_h)
    assert torch.equal(hidden_h, torch.arange(6.0).view(2, 3)) and torch.equal(weights_h, 3 * hidden_h)
    mask = s.to_device(torch.tensor([True, False, True]), key="moe_mask")
    y = s.to_device(torch.ones(2, 3), key="moe_out")
    assert torch.equal(mask, torch.tensor([True, False, True])) and torch.equal(y, torch.ones(2, 3))
    buffers = s._buffers().out
    assert buffers["moe_mask"][0].data_ptr() != buffers["moe_out"][0].data_ptr()
    assert len(waits) == 3 and fake.host_to_device == moves and fake.races == []
