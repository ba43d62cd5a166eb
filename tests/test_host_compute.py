"""The host placement: FFN layers, shares of layers and MoE experts computed on host threads.

On this CPU-only machine the device is the CPU too, so these tests run the real machinery — the
split, the worker thread, the per-pass switch, the summing, the packed kernels — and compare with
the unwrapped model: bit-equal where the arithmetic is the same (a whole layer as loaded), within
the bound `host_compute.placement.tolerance` states where it is not (a split reorders the output
projection's sum; quantized kernels round activations to bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import (
    NEW,
    PROMPT,
    TINY_CONFIGS,
    TINY_MOE_CONFIGS,
    build_tiny,
    decode_logits,
    greedy,
    relative,
    wide_llama,
)

import torus_plugins as tp
from torus_plugins.errors import ConfigError
from torus_plugins.host_compute import native
from torus_plugins.host_compute.kernels import HostComputeError, quantized_weight, stored_weight
from torus_plugins.host_compute.placement import tolerance
from torus_plugins.planning.host_split import HostCosts, balanced_share, host_rows, max_host_tokens, predict
from torus_plugins.quant import dequantize_into, int4_parts, quantize


# ---------------------------------------------------------------------- dense layers
def test_whole_layers_on_the_host_are_bit_equal_and_prefill_streams() -> None:
    model = wide_llama()
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = tp.attach(model, transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1)
    assert torch.equal(decode_logits(model), ref_logits)
    engine.reset_stats()
    assert torch.equal(greedy(model), ref_tokens)
    s = engine.stats()
    assert [layer.placement for layer in s.layers] == ["host"] * 3
    # prefill (8 tokens) streams every layer; the NEW - 1 decode passes compute on the host
    assert all(layer.host_calls == NEW - 1 and layer.hits + layer.misses == 1 for layer in s.layers)
    assert s.host_calls == 3 * (NEW - 1) and s.host_layers == 3 and s.host_max_tokens == 1
    assert "host=3" in s.summary()
    tp.detach(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("max_tokens", [1, 64])
def test_split_layers_sum_both_shares_within_the_bound(max_tokens: int) -> None:
    model = wide_llama()
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    with torch.no_grad():
        ref_prefill = model(PROMPT).logits
    engine = tp.attach(
        model, transport="copy", resident_layers=0, host_compute="auto", host_share=0.5, host_max_tokens=max_tokens
    )
    assert engine.host_plan.rows == {0: 64, 1: 64, 2: 64}
    with torch.no_grad():
        prefill = model(PROMPT).logits
    if max_tokens == 1:  # the prefill streamed: the same arithmetic as the plain model
        assert torch.equal(prefill, ref_prefill)
    else:  # computed as two shares summed
        assert 0 < relative(prefill, ref_prefill) <= tolerance(torch.float32, None)
    assert relative(decode_logits(model), ref_logits) <= tolerance(torch.float32, None)
    engine.reset_stats()
    assert torch.equal(greedy(model), ref_tokens)
    s = engine.stats()
    assert [layer.placement for layer in s.layers] == ["split"] * 3
    assert all(layer.host_share == 0.5 and layer.host_calls > 0 and layer.host_s > 0 for layer in s.layers)
    # a host pass streams only the device share: half the weights (the share unit's bytes)
    share_bytes = engine.store.buffers[engine.host.layers[0].share_unit].numel()
    assert 0.45 < share_bytes / engine.transfer_bytes[0] < 0.55
    tp.detach(model)


def test_the_per_pass_switch_streams_long_passes_and_grad_passes() -> None:
    model = wide_llama()
    x = torch.randint(0, 96, (1, 5))
    engine = tp.attach(model, transport="copy", resident_layers=0, host_compute="all", host_max_tokens=4)
    with torch.no_grad():
        model(x)  # 5 tokens > 4: streams
    assert engine.stats().host_calls == 0
    with torch.no_grad():
        model(x[:, :4])  # 4 tokens: the host
    assert engine.stats().host_calls == 3
    # autograd on: streams (host compute serves inference only), and input grads equal the plain model's
    emb = model.get_input_embeddings()(x[:, :1]).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.sum().backward()
    assert engine.stats().host_calls == 3
    got = emb.grad.clone()
    tp.detach(model)
    emb2 = emb.detach().clone().requires_grad_(True)
    model(inputs_embeds=emb2).logits.sum().backward()
    assert torch.equal(got, emb2.grad)


def test_threads_take_turns_through_split_layers() -> None:
    model = wide_llama()
    ref = greedy(model)
    tp.attach(model, transport="copy", resident_layers=0, host_compute="auto", host_share=0.25, host_max_tokens=1)
    results: list[torch.Tensor] = []

    def worker() -> None:
        for _ in range(2):
            results.append(greedy(model))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(torch.equal(r, ref) for r in results)
    tp.detach(model)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_architecture_matrix(arch: str) -> None:
    """Every dense family: half of each layer on the host (whole layers where the FFN cannot be
    cut, e.g. a fused gate_up: those stream), greedy tokens equal, decode logits within the bound."""
    model = build_tiny(arch)
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    engine = tp.attach(
        model, transport="copy", resident_layers=0, lookahead=2, host_compute="auto", host_share=0.5, host_max_tokens=1
    )
    assert relative(decode_logits(model), ref_logits) <= tolerance(torch.float32, None)
    assert torch.equal(greedy(model), ref_tokens)
    s = engine.stats()
    # OPT keeps fc1/fc2 on the decoder layer, Phi-3 fuses gate_up, GPT-2's Conv1D keeps its width
    # in an attribute, BLOOM's MLP adds the residual itself: those cannot split and stream instead
    cannot = {"opt", "phi3", "gpt2", "bloom"}
    if arch in cannot:
        assert s.host_calls == 0 and {layer.placement for layer in s.layers} == {"streamed"}
    else:
        assert s.host_calls > 0 and {layer.placement for layer in s.layers} == {"split"}
    tp.detach(model)
    assert torch.equal(greedy(model), ref_tokens)


def test_whole_layers_matrix_on_the_host() -> None:
    """Layouts that cannot split still compute whole on the host (no cut needed)."""
    for arch in ("phi3", "gpt2"):
        model = build_tiny(arch)
        ref_logits = decode_logits(model)
        engine = tp.attach(model, transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1)
        assert torch.equal(decode_logits(model), ref_logits), arch
        assert engine.stats().host_calls == len(engine.sites), arch
        tp.detach(model)


# ---------------------------------------------------------------------- quantized host kernels
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["packed", "packed-bf16", "dequantize"])
def test_quantized_host_layers_match_streamed_quantized_within_the_bound(quant: str, kernel: str) -> None:
    model = wide_llama()
    base = dict(transport="copy", resident_layers=0, weight_quant=quant)
    tp.attach(model, **base)
    ref = decode_logits(model)
    tp.detach(model)  # the model now holds the dequantized weights: both runs see the same codes
    engine = tp.attach(model, **base, host_compute="auto", host_share=0.5, host_max_tokens=1, host_kernel=kernel)
    want = {"packed": "int8pack" if quant == "int8" else "int4pack", "dequantize": "dequantize"}
    assert engine.host_plan.kernel == want.get(kernel, want["packed"])
    assert relative(decode_logits(model), ref) <= tolerance(torch.float32, quant)
    assert engine.stats().host_calls == 3
    tp.detach(model)


def test_stored_int4_host_weight_holds_the_streamed_codes() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    q, meta = quantize(w, "int4", 32)
    deq = torch.empty_like(w)
    dequantize_into(deq, q, meta, "int4")
    for cols in (slice(None), slice(64, None), slice(0, 32)):
        hw = stored_weight(q, meta, "int4", "int4pack", torch.float32, torch.float32, cols=cols)
        assert hw.kernel == "int4pack"
        xs = torch.randn(3, deq[:, cols].shape[1])
        assert relative(hw.linear(xs), xs @ deq[:, cols].T) < 1e-5
        fallback = stored_weight(q, meta, "int4", "dequantize", None, torch.float32, cols=cols)
        assert torch.allclose(fallback.linear(xs), xs @ deq[:, cols].T, atol=1e-5)
    with pytest.raises(HostComputeError, match="group boundary"):
        stored_weight(q, meta, "int4", "int4pack", None, torch.float32, cols=slice(16, None))
    i8 = quantized_weight(w, "int8", 32, "int8pack", torch.float32)
    q8, s8 = quantize(w, "int8", 32)
    xs = torch.randn(2, 128)
    assert relative(i8.linear(xs), xs @ (q8.float() * s8[:, None]).T) < 1e-5


needs_native = pytest.mark.skipif(native.unavailable() is not None, reason=str(native.unavailable()))


@needs_native
def test_native_int8_kernel_computes_the_stored_integers() -> None:
    torch.manual_seed(3)
    w = torch.randn(50, 136)  # 136 columns: activations in groups of 8
    q, scale = quantize(w, "int8", 32)
    deq = q.float() * scale[:, None]
    for cols in (slice(None), slice(64, None)):
        hw = stored_weight(q, scale, "int8", "int8native", None, torch.float32, cols=cols)
        assert hw.kernel == "int8native"
        # one byte a weight (q + 128) and a scale a row, rows padded to blocks of 16: no row sums
        assert hw.nbytes == 64 * hw.shape[1] + 64 * 4
        xs = torch.randn(3, deq[:, cols].shape[1]) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
        got, want = hw.linear(xs), xs @ deq[:, cols].T
        for g, r in zip(got, want):
            assert relative(g, r) < 2e-4
        assert torch.equal(native.q8_linear(xs, hw.tensors, hw.shape[0], hw.group, vnni=False), got)
        assert torch.equal(native.q8_linear(xs, hw.tensors, hw.shape[0], hw.group, threads=1), got)
    # a width the layout cannot take: PyTorch's dequantize path, not a guess
    odd = stored_weight(*quantize(torch.randn(8, 30), "int8", 32), "int8", "int8native", None, torch.float32)
    assert odd.kernel == "dequantize"


@needs_native
@pytest.mark.parametrize("rows", [50, 40])  # 4 blocks of 16 rows (the last padded), 3 (an odd one out)
def test_native_int4_kernel_computes_the_stored_codes(rows: int) -> None:
    torch.manual_seed(2)
    w = torch.randn(rows, 128)
    q, meta = quantize(w, "int4", 32)
    deq = torch.empty_like(w)
    dequantize_into(deq, q, meta, "int4")
    for cols in (slice(None), slice(64, None), slice(0, 32)):
        hw = stored_weight(q, meta, "int4", "int4native", None, torch.float32, cols=cols)
        assert hw.kernel == "int4native"
        xs = torch.randn(3, deq[:, cols].shape[1]) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
        got, want = hw.linear(xs), xs @ deq[:, cols].T
        # activations rounded to two int8 levels per group (host_linear.c): about fp16's precision
        for g, r in zip(got, want):
            assert relative(g, r) < 2e-4
        # the portable C path sums in the same order as the AVX-512 VNNI one: bit for bit
        portable = native.q4_linear(xs, hw.tensors, hw.shape[0], hw.group, vnni=False)
        assert torch.equal(portable, got)
        assert torch.equal(hw.linear(torch.zeros_like(xs)), torch.zeros(3, rows))
        one_thread = native.q4_linear(xs, hw.tensors, hw.shape[0], hw.group, threads=1)
        assert torch.equal(one_thread, got)
    # The kernel reads 6-bit sc / mn bytes and per-row d / dmin and forms step = d * sc itself: exact
    # in fp32 (fp16 d by a 6-bit integer), so it is the dequantizer's step bit for bit
    _, d, dmin, sc, mn = int4_parts(q, meta)
    for scale, code in ((d, sc), (dmin, mn)):
        prod = scale.double()[:, None] * code.double()
        assert torch.equal((scale[:, None] * code.float()).double(), prod)
    # hw: the last share, 32 columns (one group) of rows padded to blocks of 16. 4 bits a weight,
    # 2 bytes a (row, group), 8 a row (d, dmin): 0.56 bytes a weight at group 32, not 0.75
    padded = -(-rows // 16) * 16
    assert hw.nbytes == padded * (32 // 2 + 2 + 8)


@needs_native
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_native_kernel_runs_whole_and_split_layers(quant: str) -> None:
    """Against the same stored codes dequantized exactly (host_kernel="dequantize"): what is left
    is the kernel's activation rounding, well inside the bound the attach-time proof uses."""
    base = dict(transport="copy", resident_layers=0, weight_quant=quant, host_max_tokens=1)
    for extra in ({"host_compute": "all"}, {"host_compute": "auto", "host_share": 0.5}):
        # fresh copies of one model: both engines quantize the same weights into the same codes
        model = wide_llama()
        tp.attach(model, **base, **extra, host_kernel="dequantize")
        ref_logits, ref_tokens = decode_logits(model), greedy(model)
        tp.detach(model)
        model = wide_llama()
        engine = tp.attach(model, **base, **extra, host_kernel="native")
        assert engine.host_plan.kernel == f"{quant}native"
        assert relative(decode_logits(model), ref_logits) < 1e-3
        assert torch.equal(greedy(model), ref_tokens)
        assert engine.stats().host_calls > 0
        tp.detach(model)


@needs_native
def test_native_kernel_computes_moe_host_experts() -> None:
    base = dict(transport="copy", moe_cache_experts=8, weight_quant="int4", host_compute="all", host_max_tokens=1)
    model = build_tiny("mixtral")
    tp.attach(model, **base, host_kernel="dequantize")
    ref = decode_logits(model)
    tp.detach(model)
    model = build_tiny("mixtral")
    engine = tp.attach(model, **base, host_kernel="native")
    assert relative(decode_logits(model), ref) < 1e-3
    assert engine.stats().host_calls > 0
    tp.detach(model)


@needs_native
def test_native_kernel_under_threads_and_inference_mode() -> None:
    """Three threads through split int4 layers (the kernel's scratch is per call) and inference mode
    (the worker is not in it) give the tokens and logits of one no-grad caller."""
    model = wide_llama()
    tp.attach(
        model,
        transport="copy",
        resident_layers=0,
        weight_quant="int4",
        host_compute="auto",
        host_share=0.5,
        host_max_tokens=1,
        host_kernel="native",
    )
    ref_tokens = greedy(model)
    with torch.no_grad():
        ref = model(PROMPT[:, :1]).logits
    with torch.inference_mode():
        assert torch.equal(model(PROMPT[:, :1]).logits, ref)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.extend(greedy(model) for _ in range(2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(torch.equal(r, ref_tokens) for r in results)
    tp.detach(model)


def test_native_kernel_refusals(tmp_path) -> None:
    # A machine whose compiler fails: the kernel says why, "auto" falls back to PyTorch's kernels
    # and "native" is refused (a fresh process: the library is built once per process).
    script = (
        "import torus_plugins as tp, transformers as T, torch\n"
        "from torus_plugins.host_compute import native\n"
        "print(native.unavailable())\n"
        "cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "kw = dict(transport='copy', resident_layers=0, weight_quant='int4', host_compute='all', host_max_tokens=1)\n"
        "e = tp.attach(T.LlamaForCausalLM(cfg).eval(), **kw)\n"
        "print(e.host_plan.kernel)\n"
        "try:\n"
        "    tp.attach(T.LlamaForCausalLM(cfg).eval(), **kw, host_kernel='native')\n"
        "except tp.ConfigError as exc:\n"
        "    print('refused:', exc)\n"
        "kw.pop('weight_quant')\n"
        "e = tp.attach(T.LlamaForCausalLM(cfg).eval().to(torch.bfloat16), **kw)\n"
        "print(e.host_plan.kernel)\n"
        "try:\n"
        "    tp.attach(T.LlamaForCausalLM(cfg).eval().to(torch.bfloat16), **kw, host_kernel='native')\n"
        "except tp.ConfigError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {**os.environ, "CC": "false", "TORUS_SPARSE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0].startswith("the native int4/int8/bf16 kernels are unavailable:") and "failed" in lines[0]
    assert lines[1] in ("int4pack", "dequantize")
    assert lines[2].startswith("refused: host_kernel='native': the native int4/int8/bf16 kernels are unavailable")
    assert "host_kernel='auto'" in lines[2]
    # a bf16 model's weights as loaded: PyTorch's linear under "auto", "native" refused the same way
    assert lines[3] == "raw"
    assert lines[4].startswith("refused: host_kernel='native': the native int4/int8/bf16 kernels are unavailable")


# ---------------------------------------------------------------------- MoE experts
def test_all_on_the_host_refuses_what_cannot_compute_there() -> None:
    with pytest.raises(HostComputeError, match="BloomMLP.*host_compute='auto'"):
        tp.attach(build_tiny("bloom"), transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1)
    # GPT-OSS's experts loop has no padding index: host experts are refused ("all") or stay off ("auto")
    with pytest.raises(HostComputeError, match="padding index"):
        tp.attach(build_tiny("gpt_oss"), transport="copy", moe_cache_experts=8, host_compute="all", host_max_tokens=1)
    model = build_tiny("gpt_oss")
    ref = greedy(model)
    engine = tp.attach(model, transport="copy", moe_cache_experts=8, host_compute="auto", host_max_tokens=1)
    assert torch.equal(greedy(model), ref) and engine.stats().host_calls == 0
    tp.detach(model)


@pytest.mark.parametrize("arch", sorted(set(TINY_MOE_CONFIGS) - {"gpt_oss"}))
def test_moe_misses_are_computed_on_the_host(arch: str) -> None:
    model = build_tiny(arch)
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    engine = tp.attach(model, transport="copy", moe_cache_experts=8, host_compute="all", host_max_tokens=1)
    assert relative(decode_logits(model), ref_logits) <= tolerance(torch.float32, None)
    engine.reset_stats()
    assert torch.equal(greedy(model), ref_tokens)
    e = engine.stats().experts
    assert sum(layer.host_computed for layer in e.layers) > 0
    # a decode pass never copies a missed expert: only the predictor's prefetches and the prefill move bytes
    assert e.misses >= sum(layer.host_computed for layer in e.layers)
    tp.detach(model)


def test_quantized_moe_host_experts() -> None:
    model = build_tiny("mixtral")
    tp.attach(model, transport="copy", moe_cache_experts=8, weight_quant="int8")
    ref = decode_logits(model)
    tp.detach(model)
    engine = tp.attach(
        model,
        transport="copy",
        moe_cache_experts=8,
        weight_quant="int8",
        host_compute="all",
        host_max_tokens=1,
        host_kernel="packed",
    )
    assert relative(decode_logits(model), ref) <= tolerance(torch.float32, "int8")
    assert engine.stats().host_calls > 0
    tp.detach(model)


# ---------------------------------------------------------------------- refusals
class EntangledMLP(torch.nn.Module):
    """An FFN whose neurons are not independent (a norm across the intermediate activations): a
    split would be wrong, and the attach-time proof must say so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h / (h.norm(dim=-1, keepdim=True) + 1e-6))


def test_a_split_that_changes_the_output_is_refused(caplog) -> None:
    model = wide_llama()
    for layer in model.model.layers:
        layer.mlp.forward = EntangledMLP.forward.__get__(layer.mlp)
    ref_tokens, ref_logits = greedy(model), decode_logits(model)
    engine = tp.attach(
        model, transport="copy", resident_layers=0, host_compute="auto", host_share=0.5, host_max_tokens=1
    )
    assert "not independent" in caplog.text
    # the refused layers stream: the same arithmetic as the plain model, bit for bit
    assert torch.equal(decode_logits(model), ref_logits) and torch.equal(greedy(model), ref_tokens)
    s = engine.stats()
    assert s.host_calls == 0 and s.host_layers == 0 and {layer.placement for layer in s.layers} == {"streamed"}
    tp.detach(model)


def test_bad_host_settings_are_config_errors() -> None:
    for kwargs, match in [
        (dict(host_compute="sometimes"), "host_compute"),
        (dict(host_compute="auto", host_share=1.5), "host_share"),
        (dict(host_compute="auto", host_share=True), "host_share"),
        (dict(host_share=0.5), "host_compute='auto'"),
        (dict(host_compute="all", host_max_tokens=0), "host_max_tokens"),
        (dict(host_compute="all", host_threads=0), "host_threads"),
        (dict(host_compute="all", host_kernel="fast"), "host_kernel"),
    ]:
        with pytest.raises(ConfigError, match=match):
            tp.TorusConfig(**kwargs)
    model = wide_llama()
    with pytest.raises(ConfigError, match="zero-copy"):
        tp.attach(model, transport="zero-copy", host_compute="all", host_max_tokens=1)
    assert not tp.is_attached(model)


# ---------------------------------------------------------------------- the cost model
def test_cost_model_balances_link_and_host() -> None:
    costs = HostCosts(link_bps=25e9, host_bps=50e9, host_bps_at=40e9 * 16 / 16, probe_tokens=16, memory_bps=100e9)
    share = balanced_share(costs, 100 * 2**20, 100 * 2**20)
    assert share == pytest.approx(50 / 75)  # the host does twice the link's work per second
    assert host_rows(share, 1024, 64) == 704 and host_rows(0.01, 1024, 64) == 0 and host_rows(0.99, 1024, 64) == 1024
    # hybrid beats both single placements; host-only beats streaming on this machine
    p = predict(costs, [2**27] * 4, [2**27] * 4, [share] * 4)
    assert p.hybrid < p.host < p.streaming
    assert p.hybrid == pytest.approx(p.streaming * 25 / 75, rel=0.01)
    # a memory-starved host gets less: the link's DMA reads the same memory
    starved = HostCosts(25e9, 50e9, 40e9, 16, 40e9)
    assert balanced_share(starved, 2**27, 2**27) < share
    # the switch: host time that grows with tokens stops at some pass length
    slow_growth = HostCosts(25e9, 50e9, 45e9, 16, 100e9)
    fast_growth = HostCosts(25e9, 50e9, 5e9, 16, 100e9)
    assert max_host_tokens(slow_growth, share, 2**27, 2**27) > max_host_tokens(fast_growth, share, 2**27, 2**27) >= 1
    assert max_host_tokens(costs, 0.0, 2**27, 2**27) == 0


def test_the_aligned_split_never_predicts_slower_than_either_placement() -> None:
    """Rounding the balanced share to whole blocks must not put a block on a host so slow that
    it outlasts streaming the whole layer (seen under load: memory starved, the host at its floor)."""
    import random

    from torus_plugins.planning.host_split import forecast

    rng = random.Random(0)
    for _ in range(3000):
        costs = HostCosts(8e9, rng.uniform(1e8, 6e10), rng.uniform(1e8, 6e10), 16, rng.uniform(1e9, 6e10))
        f = forecast(costs, [10_000_000] * 4, 1536, 16, "native", None)
        assert f.rows % 16 == 0 and 0 <= f.rows <= 1536
        assert f.seconds.hybrid <= min(f.seconds.streaming, f.seconds.host) + 1e-12, costs


def test_plan_forecasts_the_hybrid_split_the_engine_uses(smollm2_path: str) -> None:
    from torus_adapters.transformers_adapter.planning import plan_model

    config = tp.TorusConfig(transport="copy", resident_layers=26)
    plan = plan_model(smollm2_path, config, bandwidth="8GB/s")
    f = plan.host
    assert f is not None and f.layers == 4 and f.intermediate == 1536
    assert f.costs.link_bps == 8e9 and f.costs.memory_bps > 0 and f.costs.host_bps > 0
    assert f.rows % 16 == 0 and f.share == f.rows / 1536
    assert f.seconds.hybrid <= min(f.seconds.streaming, f.seconds.host) + 1e-12
    text = plan.render()
    assert "streaming-only" in text and "hybrid split" in text and 'host_compute="auto"' in text
    assert plan.as_dict()["host"]["host_rows"] == f.rows
    # the engine given the same rates picks the same rows
    from torus_plugins.planning.host_split import balanced_rows

    b = plan.streamed_bytes_per_token // 4
    assert balanced_rows(f.costs, b, b, 1536, 16) == f.rows


def test_host_threads_apply_while_attached_and_are_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever the suite runs with, so the restore is visible
    try:
        model = wide_llama()
        tp.attach(model, transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1, host_threads=1)
        assert torch.get_num_threads() == 1
        tp.detach(model)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_split_layers_under_inference_mode_match_no_grad() -> None:
    """The worker thread is not in inference mode when the caller is: its share must still compute
    (on inference tensors, autograd off) and sum to the same logits."""
    model = wide_llama()
    tp.attach(model, transport="copy", resident_layers=0, host_compute="auto", host_share=0.5, host_max_tokens=64)
    with torch.no_grad():
        ref = model(PROMPT[:, :1]).logits
    with torch.inference_mode():
        got = model(PROMPT[:, :1]).logits
    assert torch.equal(got, ref)
    tp.detach(model)
