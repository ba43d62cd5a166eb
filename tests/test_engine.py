"""Engine behaviour on a real (tiny) transformers model: ordering, misses, failures, lifecycle."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pluggy
import pytest
import torch

import torus_plugins as tp
from torus_plugins.builtin.transports import CpuCopyWorker
from torus_plugins.plugins import build_plugin_manager

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def greedy(model: torch.nn.Module, n: int = 8) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def manager_with(*plugins: object) -> pluggy.PluginManager:
    """A fresh plugin manager: built-ins plus throwaway test plugins (never the global one)."""
    pm = build_plugin_manager(autoload=False)
    for p in plugins:
        pm.register(p)
    return pm


class TransportPlugin:
    """Registers one extra transport class under its `name`."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    @tp.hookimpl
    def torus_register_transports(self, register):
        register(self.cls.name, self.cls)


class SplitSlowCopy(CpuCopyWorker):
    """Writes each layer in two halves and writes the second half only once compute is already
    waiting for that copy: computing before `ready` would read a half-written slot and change
    the logits, and every wait is a real stall (no timing luck involved)."""

    name = "split-slow"

    def __init__(self, opts):
        super().__init__(opts)
        self._waited: dict[object, threading.Event] = {}

    def copy(self, dst, src, after):
        waited = threading.Event()
        fence = self._pool.submit(self._split_copy, dst, src, waited)
        self._waited[fence] = waited
        return fence

    def _split_copy(self, dst, src, waited):
        half = src.numel() // 2
        dst[:half].copy_(src[:half])
        waited.wait(timeout=2)  # hold the second half until compute waits for this copy
        time.sleep(0.001)
        dst[half:].copy_(src[half:])

    def wait(self, fence):
        waited = self._waited.pop(fence, None)
        if waited is not None:
            waited.set()
        return super().wait(fence)


class FailingCopy(CpuCopyWorker):
    """The fifth copy raises inside the worker thread."""

    name = "failing"
    fail_at = 5

    def __init__(self, opts):
        super().__init__(opts)
        self.count = 0

    def _copy_now(self, dst, src):
        self.count += 1
        if self.count == self.fail_at:
            raise OSError("simulated DMA failure")
        super()._copy_now(dst, src)


class StuckCopy(CpuCopyWorker):
    """Copies block until `release` is set: a transfer that never finishes on its own."""

    name = "stuck"
    release = threading.Event()

    def _copy_now(self, dst, src):
        self.release.wait(timeout=30)
        super()._copy_now(dst, src)


class NoPrefetch:
    """A policy that never prefetches: every streamed layer is a synchronous load (a miss)."""

    @tp.hookimpl
    def torus_register_prefetch_policies(self, register):
        class Never:
            def __init__(self, ctx):
                pass

            def warmup(self):
                return ()

            def after(self, layer):
                return ()

        register("never", Never)


def test_copies_complete_before_compute(tiny_llama):
    ref_logits, ref_tokens = logits(tiny_llama), greedy(tiny_llama)
    pm = manager_with(TransportPlugin(SplitSlowCopy))
    engine = tp.attach(
        tiny_llama, tp.TorusConfig(transport="split-slow", resident_layers=0, lookahead=1), plugin_manager=pm
    )
    assert torch.equal(logits(tiny_llama), ref_logits)
    assert torch.equal(greedy(tiny_llama), ref_tokens)
    stats = engine.stats()
    assert stats.stall_s > 0  # compute really waited for copies in flight
    assert stats.misses == 0
    tp.detach(tiny_llama)


def test_misses_load_synchronously_and_count(tiny_llama):
    ref = greedy(tiny_llama)
    engine = tp.attach(
        tiny_llama,
        tp.TorusConfig(transport="copy", prefetch="never", resident_layers=0),
        plugin_manager=manager_with(NoPrefetch()),
    )
    assert torch.equal(greedy(tiny_llama), ref)
    s = engine.stats()
    assert s.hits == 0
    assert s.misses == s.streamed_layers * s.forward_passes
    assert s.bytes_moved == sum(engine.layer_bytes) * s.forward_passes
    tp.detach(tiny_llama)


def test_sequential_prefetch_hits_every_layer(tiny_llama):
    engine = tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=0, lookahead=2))
    greedy(tiny_llama)
    s = engine.stats()
    assert s.misses == 0 and s.hits == s.streamed_layers * s.forward_passes
    tp.detach(tiny_llama)


def test_transport_failure_reaches_caller_and_detach_is_clean(tiny_llama):
    ref = greedy(tiny_llama)
    pm = manager_with(TransportPlugin(FailingCopy))
    tp.attach(tiny_llama, tp.TorusConfig(transport="failing", resident_layers=0), plugin_manager=pm)
    raised: list[BaseException] = []

    def run():
        try:
            greedy(tiny_llama)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=20)  # a hang guard, not a timing assertion
    assert not t.is_alive(), "generate hung after a transfer failure"
    assert len(raised) == 1 and isinstance(raised[0], tp.TransferError)
    assert "simulated DMA failure" in str(raised[0])
    tp.detach(tiny_llama)
    assert torch.equal(greedy(tiny_llama), ref)


def test_stuck_transfer_times_out(tiny_llama):
    ref = greedy(tiny_llama)
    StuckCopy.release.clear()
    pm = manager_with(TransportPlugin(StuckCopy))
    tp.attach(
        tiny_llama, tp.TorusConfig(transport="stuck", resident_layers=0, transfer_timeout_s=0.3), plugin_manager=pm
    )
    with pytest.raises(tp.TransferError, match="did not finish"):
        greedy(tiny_llama)
    StuckCopy.release.set()
    tp.detach(tiny_llama)
    assert torch.equal(greedy(tiny_llama), ref)


def test_interrupt_inside_ffn_leaves_model_usable(tiny_llama):
    ref = greedy(tiny_llama)
    engine = tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=0, lookahead=1))
    calls = {"n": 0}

    def interrupt_once(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    # Inside layer 1's FFN: after the engine bound its slot, before it released it.
    handle = tiny_llama.model.layers[1].mlp.up_proj.register_forward_hook(interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        greedy(tiny_llama)
    handle.remove()
    assert torch.equal(greedy(tiny_llama), ref)
    assert engine.stats().misses <= 1
    tp.detach(tiny_llama)


def test_attach_twice_and_detach_unattached(tiny_llama):
    ref = logits(tiny_llama)
    with pytest.raises(tp.NotAttachedError, match="attach"):
        tp.detach(tiny_llama)
    engine = tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=1))
    with pytest.raises(tp.AlreadyAttachedError, match="detach"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="copy"))
    assert tp.get_engine(tiny_llama) is engine  # the first engine is untouched
    assert torch.equal(logits(tiny_llama), ref)
    tp.detach(tiny_llama)
    with pytest.raises(tp.NotAttachedError):
        tp.detach(tiny_llama)
    assert torch.equal(logits(tiny_llama), ref)


def test_zero_copy_binds_host_store_without_hooks(tiny_llama):
    ref = greedy(tiny_llama)
    engine = tp.attach(tiny_llama, tp.TorusConfig(transport="zero-copy"))
    assert not any(m._forward_pre_hooks for m in tiny_llama.modules())
    w = tiny_llama.model.layers[0].mlp.gate_proj.weight
    buf = engine.store.buffers[0]
    assert buf.data_ptr() <= w.data_ptr() < buf.data_ptr() + buf.numel()  # computes from the store itself
    assert torch.equal(greedy(tiny_llama), ref)
    assert engine.stats().bytes_moved == 0
    tp.detach(tiny_llama)
    assert torch.equal(greedy(tiny_llama), ref)


def test_budget_decides_residency_and_bounds_device_bytes(tiny_llama):
    probe = tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=0, kv_reserve_tokens=0))
    layer, non_ffn = probe.layer_bytes[0], probe.non_ffn_bytes
    tp.detach(tiny_llama)
    # Room for the ring (lookahead 1 → 2 slots) plus one resident layer, not two.
    budget = non_ffn + 3 * layer + layer // 2
    engine = tp.attach(
        tiny_llama, tp.TorusConfig(transport="copy", vram_budget=budget, lookahead=1, kv_reserve_tokens=0)
    )
    s = engine.stats()
    assert s.resident_layers == 1 and s.streamed_layers == 3
    assert s.peak_device_bytes <= budget
    tp.detach(tiny_llama)


def test_bad_config_is_rejected_before_touching_the_model(tiny_llama):
    ref = logits(tiny_llama)
    with pytest.raises(tp.ConfigError, match="available: copy, cuda, simulated-link, zero-copy"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="warp-drive"))
    with pytest.raises(tp.ConfigError, match="sequential"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=0, prefetch="psychic"))
    with pytest.raises(tp.ConfigError, match="only 4 FFN layers"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="copy", resident_layers=9))
    assert not tp.is_attached(tiny_llama)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_llama.modules())
    assert torch.equal(logits(tiny_llama), ref)


_RSS_SCRIPT = r"""
import sys, torch, transformers as T, torus_plugins as tp
torch.manual_seed(0)
cfg = T.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=8192, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=4)
model = T.LlamaForCausalLM(cfg).eval()
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
before = rss()
engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0, lookahead=1))
print(hwm() - before, engine.layer_bytes[0], sum(engine.layer_bytes))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_attach_holds_at_most_one_extra_layer_in_host_memory():
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, check=True)
    growth, layer, total = map(int, out.stdout.split()[-3:])
    # Packing copies layer by layer and frees each original at once: the peak grows by about
    # one layer (plus allocator slack), never by the whole FFN (8 layers here).
    assert growth < 2 * layer, f"peak host memory grew by {growth} bytes; one layer is {layer}, all are {total}"


class NoMemory(CpuCopyWorker):
    """Device slot allocation fails, after every FFN layer was already packed and placed."""

    name = "no-memory"

    def alloc(self, nbytes):
        raise MemoryError("simulated out of device memory")


def test_failed_attach_rolls_back_completely(tiny_llama):
    ref = logits(tiny_llama)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(MemoryError):
        tp.attach(
            tiny_llama,
            tp.TorusConfig(transport="no-memory", resident_layers=1),
            plugin_manager=manager_with(TransportPlugin(NoMemory)),
        )
    assert not tp.is_attached(tiny_llama)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_llama.modules())
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(tiny_llama), ref)


@pytest.mark.parametrize("mode", ["copy", "time-only"])
def test_simulated_link_modes_compute_the_same_and_pace_the_ring(tiny_llama, mode):
    ref = greedy(tiny_llama)
    opts = {"link_bandwidth": "200MB/s", "link_latency_s": 1e-4, "link_mode": mode}
    engine = tp.attach(
        tiny_llama, tp.TorusConfig(transport="simulated-link", resident_layers=0, lookahead=1, options=opts)
    )
    assert engine.transport.aliases_source == (mode == "time-only")
    assert torch.equal(greedy(tiny_llama), ref)
    s = engine.stats()
    assert s.misses == 0 and s.bytes_moved >= s.streamed_bytes_per_pass * s.forward_passes
    tp.detach(tiny_llama)
    with pytest.raises(tp.ConfigError, match="link_mode"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="simulated-link", options={"link_mode": "teleport"}))
    with pytest.raises(tp.ConfigError, match="link_bandwidth"):
        tp.attach(tiny_llama, tp.TorusConfig(transport="simulated-link", options={"link_bandwidth": "fast"}))
    assert not tp.is_attached(tiny_llama)


# ---------------------------------------------------------------- grad modes, shared weights, GC
GRAD_MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attach_mode", ["inference", "no_grad"])
def test_any_sequence_of_grad_modes_works_and_matches(quant, dtype, attach_mode):
    """Views and slots made inside inference mode would be inference tensors: a later no-grad
    pass could not write them, a grad-enabled one could not save them for backward."""
    from conftest import build_tiny

    model = build_tiny("llama").to(dtype)
    cfg = tp.TorusConfig(transport="copy", resident_layers=1, weight_quant=quant, quant_group_size=16)
    with GRAD_MODES[attach_mode]():
        tp.attach(model, cfg)
    with torch.no_grad():
        ref = model(PROMPT).logits
    for mode in ["inference", "no_grad", "grad", "inference", "grad", "no_grad"]:
        with GRAD_MODES[mode]():
            out = model(PROMPT).logits
        assert torch.equal(out.detach(), ref), mode
    with torch.inference_mode():
        greedy(model, 3)
    with torch.no_grad():
        greedy(model, 3)
    tp.detach(model)


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("llama", dict(resident_layers=0)),
        ("llama", dict(resident_layers=0, weight_quant="int8")),
        ("mixtral", dict(moe_cache_experts=8)),  # a quarter of the experts: slots are reused
    ],
)
def test_backward_through_streamed_layers_equals_the_plain_model(arch, cfg):
    """Autograd saves the weights a layer used; a streamed weight is a slot that later layers
    overwrite, so the engine must save a copy for backward."""
    from conftest import build_tiny

    def input_grad(model):
        emb = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.square().sum().backward()
        return emb.grad

    model = build_tiny(arch)
    with torch.inference_mode():
        tp.attach(model, tp.TorusConfig(transport="copy", **cfg))
        model(PROMPT)  # views first built inside inference mode
    got = input_grad(model)
    tp.detach(model)  # with int8: the dequantized weights the engine computed with
    for p in model.parameters():
        p.requires_grad_(False)
    assert torch.equal(got, input_grad(model))


def test_layers_sharing_one_ffn_module_stay_resident_and_detach_restores_them():
    from conftest import build_tiny

    model = build_tiny("llama")
    model.model.layers[2].mlp = model.model.layers[0].mlp  # layers 0 and 2 share one FFN
    ref_logits, ref_tokens = logits(model), greedy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    assert engine.sizes.shared == (0, 2)
    assert [s.layer for s in engine.stats().layers] == [1, 3]  # numbered as decoder layers
    assert torch.equal(logits(model), ref_logits)
    assert torch.equal(greedy(model), ref_tokens)
    assert engine.stats().bytes_moved > 0  # layers 1 and 3 really stream
    tp.detach(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[2].mlp is model.model.layers[0].mlp


def test_a_weight_tied_inside_one_ffn_is_not_streamed():
    from conftest import build_tiny

    model = build_tiny("llama")
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight = mlp.gate_proj.weight
    ref = logits(model)
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    assert engine.sizes.shared == (1,)
    assert torch.equal(logits(model), ref)
    tp.detach(model)
    assert mlp.up_proj.weight is mlp.gate_proj.weight
    assert torch.equal(logits(model), ref)


def test_streamed_weights_do_not_require_grad_so_autocast_caches_no_copy_of_them():
    """Autocast caches a cast copy of every weight that requires grad for its whole region: for
    streamed weights that is a device copy of every layer, past the budget. Measured with the
    profiler's allocation events (deterministic, unlike RSS): the memory a forward pass leaves
    allocated inside the autocast region."""
    import transformers as T
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ffn = [p for layer in model.model.layers for p in layer.mlp.parameters()]
    ffn_bf16 = sum(p.numel() for p in ffn) * 2

    def held_inside_autocast() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(PROMPT)
            return sum(e.cpu_memory_usage for e in prof.events())

    plain = held_inside_autocast()
    for p in ffn:
        p.requires_grad_(False)
    plain_frozen = held_inside_autocast()
    for p in ffn:
        p.requires_grad_(True)
    assert plain - plain_frozen >= 0.9 * ffn_bf16  # the cache exists, and this measure sees it
    grads = [p.requires_grad for p in model.parameters()]
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    assert not any(p.requires_grad for ps in engine._params for p in ps)
    assert held_inside_autocast() <= plain_frozen + 0.05 * ffn_bf16
    tp.detach(model)
    assert [p.requires_grad for p in model.parameters()] == grads


def test_a_model_collected_while_attached_drains_its_transport_first():
    import gc
    import weakref

    from conftest import build_tiny

    model = build_tiny("llama")
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    with torch.no_grad():
        model(PROMPT)  # leaves prefetches of the next pass queued
    transport, store = engine.transport, engine.store
    closed = []
    close = transport.close
    transport.close = lambda: (closed.append(len(store.buffers) and store.buffers[0] is not None), close())
    ref = weakref.ref(model)
    del model, engine
    gc.collect()
    assert ref() is None
    assert closed == [True]  # closed once, while the host buffers still existed
    assert all(b is None for b in store.buffers)  # then the host memory was released
