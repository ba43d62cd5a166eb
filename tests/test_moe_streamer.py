"""MoE expert streaming: one matrix over architecture × predictor × cache size × lookahead, then
bad input. Every case compares against the unwrapped model run with eager experts (the same
per-expert arithmetic), so logits must be bit-equal and greedy tokens identical."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MOE_CONFIGS, build_tiny

import torus_plugins as tp
from torus_plugins.errors import BudgetTooSmallError, ConfigError

ARCHS = sorted(TINY_MOE_CONFIGS)
PREDICTORS = ["speculative", "learned", "frequency", "none"]
CACHES = ["tiny", "half", "all"]
PROMPT = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 22, 71, 14, 33, 2]])
NEW_TOKENS = 6


def _reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = build_tiny(name)
    with torch.no_grad():
        return model(PROMPT).logits, model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


_REFS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _REFS:
        _REFS[name] = _reference(name)
    return _REFS[name]


_PREDICTOR_FILES: dict[str, str] = {}


def predictor_file(name: str, tmp_dir) -> str:
    """A learned predictor trained (briefly) on the tiny model's own routing of random tokens."""
    if name not in _PREDICTOR_FILES:
        from torus_adapters.tools.routing_traces import fingerprint_of, record_traces
        from torus_plugins.moe.predictor_net import save_predictor
        from torus_plugins.moe.training import train_predictor

        model = build_tiny(name)
        fp = fingerprint_of(model)
        ids = torch.randint(0, 96, (1, 256), generator=torch.Generator().manual_seed(3))
        traces = record_traces(model, None, ids, 256)
        net, _ = train_predictor(traces, fp, horizon=2, epochs=2, seed=0)
        path = str(tmp_dir / f"{name}.safetensors")
        save_predictor(path, net, fp, 2)
        _PREDICTOR_FILES[name] = path
    return _PREDICTOR_FILES[name]


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("predictors")


def cache_size(model: torch.nn.Module, kind: str) -> int:
    from torus_adapters.transformers_adapter.moe_architectures import moe_info

    info = moe_info(model)
    total = info["moe_layers"] * info["experts"]
    return {"tiny": info["top_k"], "half": total // 2, "all": total}[kind]


def assert_consistent(engine: tp.Engine) -> None:
    """Counters agree with each other, and every cached expert holds exactly its host bytes."""
    st = engine.stats().experts
    assert st is not None
    for layer in st.layers:
        assert layer.hits + layer.misses == layer.routed
        assert layer.bytes_moved == layer.loads * st.expert_bytes
        assert layer.wasted_bytes <= layer.bytes_moved
        assert layer.misses <= layer.loads
        assert layer.predicted_correct <= layer.predicted_routed <= layer.routed
    streamer = engine.experts
    held = 0
    for ring in streamer.cache.rings:
        for slot in ring.slots:
            if slot.layer is None:
                continue
            held += 1
            engine.transport.wait(slot.ready)
            src = streamer.store.buffers[slot.layer]
            assert torch.equal(slot.buffer[: src.numel()], src), f"slot {slot.index} is stale"
    assert held <= st.cache_experts


@pytest.mark.parametrize("lookahead", [1, 2])
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matrix(arch: str, predictor: str, cache: str, lookahead: int, predictor_dir) -> None:
    ref_logits, ref_tokens = reference(arch)
    path = predictor_file(arch, predictor_dir) if predictor == "learned" else None
    model = build_tiny(arch)
    engine = tp.attach(
        model,
        transport="copy",
        moe_cache_experts=cache_size(model, cache),
        moe_predictor=predictor,
        moe_predictor_path=path,
        lookahead=lookahead,
    )
    try:
        with torch.no_grad():
            logits = model(PROMPT).logits
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(tokens, ref_tokens)
        assert_consistent(engine)
        st = engine.stats().experts
        assert st.routed > 0 and st.loads > 0
        if cache == "all" and predictor == "none":
            # Every expert is loaded at most once and then stays: misses = distinct experts seen.
            assert st.loads == st.misses <= st.total_experts
            assert st.wasted_bytes == 0
        if predictor == "none":
            assert st.recall is None and all(layer.predicted == 0 for layer in st.layers)
        else:
            assert st.recall is not None
    finally:
        tp.detach(model)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_slow_link_never_computes_from_unlanded_slot(arch: str) -> None:
    """Copies that take real time (a 20 MB/s link with latency) must still be waited for."""
    ref_logits, ref_tokens = reference(arch)
    model = build_tiny(arch)
    engine = tp.attach(
        model,
        transport="simulated-link",
        moe_cache_experts=4,
        options={"link_bandwidth": "20MB/s", "link_latency_s": 0.0005},
    )
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)
        assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), ref_tokens)
    assert_consistent(engine)
    assert engine.stats().experts.stall_s > 0
    tp.detach(model)


def test_scopes_and_eviction_policies_agree_with_eager() -> None:
    ref_logits, ref_tokens = reference("qwen3_moe")
    for scope in ("shared", "per-layer"):
        for eviction in ("lru", "lfu", "next-use"):
            model = build_tiny("qwen3_moe")
            engine = tp.attach(
                model, transport="copy", moe_cache_experts=16, moe_cache_scope=scope, moe_eviction=eviction
            )
            with torch.no_grad():
                assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), ref_tokens)
            assert_consistent(engine)
            if scope == "per-layer":
                assert [len(r) for r in engine.experts.cache.rings] == [4, 4, 4, 4]
            tp.detach(model)


def test_more_prefetch_raises_hits_and_bytes() -> None:
    """`moe_expert_prefetch_k` trades hit rate against wasted bytes."""
    rows = {}
    for k in (0, 2, 6):
        model = build_tiny("mixtral")
        engine = tp.attach(model, transport="copy", moe_cache_experts=16, moe_expert_prefetch_k=k)
        with torch.no_grad():
            model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        rows[k] = engine.stats().experts
        tp.detach(model)
    assert rows[0].hit_rate <= rows[2].hit_rate <= rows[6].hit_rate
    assert rows[6].hit_rate > rows[0].hit_rate
    assert rows[6].bytes_moved > rows[0].bytes_moved


def test_quantized_experts_stream_equal_to_cached_all() -> None:
    """int8 experts: a tiny cache (constant reloading) computes exactly what a full cache does."""
    outs = []
    for cache in (2, 32):
        model = build_tiny("mixtral")
        experts = model.model.layers[0].mlp.experts
        fp32_bytes = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4
        engine = tp.attach(model, transport="copy", moe_cache_experts=cache, weight_quant="int8")
        with torch.no_grad():
            outs.append(model(PROMPT).logits)
        # int8 + one fp32 scale per row: a bit over a quarter of the fp32 bytes cross the link.
        assert engine.stats().experts.expert_bytes <= 0.3 * fp32_bytes
        tp.detach(model)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_expert_is_dequantized_once_per_landing(quant: str, monkeypatch) -> None:
    """A cache hit binds the weights dequantized at the expert's landing; only a new landing
    (a load, here none once every expert is cached) dequantizes again, and the logits agree."""
    import torus_plugins.slots as slots

    calls = []
    real = slots.materialize
    monkeypatch.setattr(slots, "materialize", lambda *a: (calls.append(1), real(*a)))
    for cache in (32, 4):  # every expert cached; then a cache that keeps reloading
        model = build_tiny("mixtral")
        engine = tp.attach(model, transport="copy", moe_cache_experts=cache, weight_quant=quant)
        calls.clear()
        with torch.no_grad():
            first = model(PROMPT).logits
            assert len(calls) == engine.stats().experts.loads
            again = model(PROMPT).logits
        assert len(calls) == engine.stats().experts.loads  # one dequantization per landing, none per hit
        if cache == 32:
            assert engine.stats().experts.hits > 0 and len(calls) <= 32
        assert torch.equal(first, again)
        tp.detach(model)


def test_budget_sizes_the_cache_and_stats_reach_engine_totals() -> None:
    model = build_tiny("mixtral")
    probe = tp.attach(model, transport="copy", kv_reserve_tokens=0)
    non_ffn, expert = probe.non_ffn_bytes, probe.stats().experts.expert_bytes
    tp.detach(model)
    engine = tp.attach(model, transport="copy", kv_reserve_tokens=0, vram_budget=non_ffn + 10 * expert + 100)
    assert engine.stats().experts.cache_experts == 10
    with torch.no_grad():
        model(PROMPT)
    st = engine.stats()
    assert st.bytes_moved == st.experts.bytes_moved > 0
    assert st.hits + st.misses == st.experts.routed
    d = st.as_dict()
    assert d["experts"]["hit_rate"] == st.experts.hit_rate and "wasted_share" in d["experts"]
    engine.reset_stats()
    assert engine.stats().experts.routed == 0
    tp.detach(model)


def test_streamed_vs_default_grouped_mm_within_stated_bound() -> None:
    """Against transformers' default experts implementation (grouped_mm, another summation
    order) logits differ by rounding only: bound |Δ| <= 1e-5 × max|logit| in fp32 (measured:
    1.2e-7 to 2.4e-7 on every family), and greedy tokens are identical."""
    import transformers as T

    for name in ARCHS:
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(TINY_MOE_CONFIGS[name]()).eval()
        assert model.config._experts_implementation == "grouped_mm"
        with torch.no_grad():
            ref = model(PROMPT).logits
            ref_tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        tp.attach(model, transport="copy", moe_cache_experts=4)
        with torch.no_grad():
            got = model(PROMPT).logits
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        tp.detach(model)
        assert model.config._experts_implementation == "grouped_mm"  # restored on detach
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), name
        assert torch.equal(tokens, ref_tokens), name


def _grouped_model(name: str) -> torch.nn.Module:
    """The tiny model as transformers builds it by default: grouped_mm experts."""
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(TINY_MOE_CONFIGS[name]()).eval()
    if name == "deepseek_v3":
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.rand(bias.shape) * 0.1)
    return model


@pytest.mark.parametrize("predictor", ["none", "speculative"])
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_path_equals_plain_grouped_mm(arch: str, cache: str, predictor: str, monkeypatch) -> None:
    """A grouped_mm model keeps grouped_mm over the cache's stacked slots: a pass whose routed
    experts all fit the cache equals the unwrapped model bit for bit (the same groups, numbered by
    slot); a pass routing more experts than the cache holds (the 12-token prompt with the tiny
    cache) falls back to the eager loop, within the stated bound |Δ| <= 1e-5 x max|logit|;
    greedy tokens are identical either way."""
    from torus_plugins.moe import streamer as streamer_mod

    model = _grouped_model(arch)
    with torch.no_grad():
        ref = model(PROMPT).logits
        ref_tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    paths = {"grouped": 0}
    real = streamer_mod.ExpertStreamer._run_grouped

    def counted(self, *a, **k):
        paths["grouped"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(streamer_mod.ExpertStreamer, "_run_grouped", counted)
    engine = tp.attach(model, transport="copy", moe_cache_experts=cache_size(model, cache), moe_predictor=predictor)
    try:
        assert engine.experts._stack is not None
        with torch.no_grad():
            got = model(PROMPT).logits
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(tokens, ref_tokens)
        if cache == "tiny":
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        else:
            assert torch.equal(got, ref)
        assert paths["grouped"] >= NEW_TOKENS - 1  # every decode step of every MoE layer at least
        assert_consistent(engine)
    finally:
        tp.detach(model)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)


# ---------------------------------------------------------------------- bad input
def test_predictor_file_for_another_model_is_a_clear_error(predictor_dir) -> None:
    path = predictor_file("mixtral", predictor_dir)
    model = build_tiny("olmoe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"model_type.*mixtral.*olmoe|model_type.*olmoe.*mixtral"):
        tp.attach(model, transport="copy", moe_predictor="learned", moe_predictor_path=path)
    assert not tp.is_attached(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    missing = predictor_dir / "missing.safetensors"
    with pytest.raises(ConfigError, match="missing.safetensors"):
        tp.attach(model, transport="copy", moe_predictor="learned", moe_predictor_path=str(missing))
    assert not tp.is_attached(model)


def test_cache_smaller_than_top_k_names_the_minimum() -> None:
    model = build_tiny("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetTooSmallError, match=r"minimum is 2 experts") as info:
        tp.attach(model, transport="copy", moe_cache_experts=1)
    assert info.value.minimum_bytes > 0
    with pytest.raises(BudgetTooSmallError, match=r"minimum is 8 experts .*top-2 for each of 4 layers"):
        tp.attach(model, transport="copy", moe_cache_experts=6, moe_cache_scope="per-layer")
    assert not tp.is_attached(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_budget_too_small_for_experts_names_the_minimum() -> None:
    model = build_tiny("mixtral")
    probe = tp.attach(model, transport="copy", kv_reserve_tokens=0)
    non_ffn = probe.non_ffn_bytes
    tp.detach(model)
    with pytest.raises(BudgetTooSmallError, match="minimum is 2 experts"):
        tp.attach(model, transport="copy", kv_reserve_tokens=0, vram_budget=non_ffn + 10)


def test_unknown_predictor_and_zero_copy_are_config_errors() -> None:
    model = build_tiny("olmoe")
    with pytest.raises(ConfigError, match="unknown moe_predictor 'oracle'.*speculative"):
        tp.attach(model, transport="copy", moe_predictor="oracle")
    with pytest.raises(ConfigError, match="needs a transport that copies"):
        tp.attach(model, transport="zero-copy")
    with pytest.raises(ConfigError, match="moe_predictor_path"):
        tp.attach(model, transport="copy", moe_predictor="learned")
    assert not tp.is_attached(model)
    with pytest.raises(ConfigError, match="moe_cache_scope"):
        tp.TorusConfig(moe_cache_scope="global")
    with pytest.raises(ConfigError, match="moe_eviction"):
        tp.TorusConfig(moe_eviction="fifo")
    with pytest.raises(ConfigError, match="moe_cache_experts"):
        tp.TorusConfig(moe_cache_experts=0)


def test_auto_transport_copies_on_cpu_for_moe() -> None:
    model = build_tiny("mixtral")
    engine = tp.attach(model)
    assert engine.transport.name == "copy"
    tp.detach(model)


# ---------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, smollm2_path):
    """A saved tiny Mixtral with the SmolLM2 tokenizer: loadable by `pipeline()` and `TorusModel`."""
    import transformers as T

    torch.manual_seed(0)
    config = T.MixtralConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tiny-mixtral")
    T.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    T.AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(out)
    return str(out)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_pipeline_with_plugin_enabled_streams_experts(tiny_moe_dir):
    import transformers as T

    plain = T.pipeline("text-generation", model=tiny_moe_dir)
    want = plain(CHAT, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    with tp.enabled(moe_cache_experts=6, moe_predictor="speculative"):
        pipe = T.pipeline("text-generation", model=tiny_moe_dir)
    assert tp.is_attached(pipe.model)
    got = pipe(CHAT, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    assert got == want
    st = tp.get_engine(pipe.model).stats()
    assert st.experts.cache_experts == 6 and st.experts.loads > 0 and st.bytes_moved == st.experts.bytes_moved


def test_torus_model_on_moe_checkpoint_reports_expert_stats(tiny_moe_dir):
    tm = tp.TorusModel.from_pretrained(tiny_moe_dir, tp.TorusConfig(moe_cache_experts=4, moe_eviction="lfu"))
    text = tm.generate("Hello", max_new_tokens=6)
    assert isinstance(text, str)
    d = tm.stats().as_dict()
    assert d["experts"]["eviction"] == "lfu" and d["experts"]["routed"] > 0
    assert "experts: cache=4/24" in tm.stats().summary()


@pytest.mark.parametrize("arch", ARCHS)
def test_one_expert_reads_lazily_from_the_checkpoint(arch: str, tmp_path) -> None:
    """Checkpoints keep experts apart: one expert's bytes, read alone, equal the loaded slice."""
    from torus_adapters.transformers_adapter.expert_checkpoint import CheckpointExperts
    from torus_adapters.transformers_adapter.moe_architectures import MOE_ARCHITECTURES

    model = build_tiny(arch)
    model.save_pretrained(tmp_path)
    ckpt = CheckpointExperts(tmp_path)
    arch_row = next(a for a in MOE_ARCHITECTURES if a.matches(model))
    for site in arch_row.expert_sites(model):
        for e in (0, site.num_experts - 1):
            got = ckpt.read(site.layer, e)
            assert sorted(got) == sorted(attr for _, attr in site.params)
            for attr, t in got.items():
                assert torch.equal(t, getattr(site.module, attr)[e].detach()), (arch, site.layer, e, attr)
    with pytest.raises(KeyError, match="no experts of layer 99"):
        ckpt.read(99, 0)
