"""The architecture matrix: every family × lookahead 1..3 × residency none/half/all, copy transport.

For each cell: logits equal to the unwrapped model's bit for bit, greedy tokens identical, the
engine's byte counters consistent with its plan, and the model restored exactly by detach.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as T
from conftest import TINY_CONFIGS, build_tiny

import torus_plugins as tp

RESIDENCY = {"none": lambda n: 0, "half": lambda n: n // 2, "all": lambda n: n}
PROMPT = torch.tensor([[5, 17, 42, 8, 63, 21, 9, 77]])
NEW_TOKENS = 8


@functools.lru_cache(maxsize=None)
def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and greedy tokens of the unwrapped model (computed once per family)."""
    model = build_tiny(name)
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    return logits, tokens


@pytest.mark.parametrize("residency", list(RESIDENCY))
@pytest.mark.parametrize("lookahead", [1, 2, 3])
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_streamed_equals_unwrapped(arch: str, lookahead: int, residency: str) -> None:
    ref_logits, ref_tokens = reference(arch)
    model = build_tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = len(tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0)).sites)
    tp.detach(model)

    engine = tp.attach(
        model, tp.TorusConfig(transport="copy", lookahead=lookahead, resident_layers=RESIDENCY[residency](n_layers))
    )
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    stats = engine.stats()
    tp.detach(model)

    assert torch.equal(logits, ref_logits), f"{arch}: logits differ (max {(logits - ref_logits).abs().max()})"
    assert torch.equal(tokens, ref_tokens)
    streamed = stats.streamed_layers
    assert stats.resident_layers + streamed == n_layers
    if streamed:
        # Every streamed layer runs once per forward pass; the ring never computes without a slot.
        assert stats.hits + stats.misses == streamed * stats.forward_passes
        assert stats.forward_passes == 1 + NEW_TOKENS - 1 + 1  # one plain forward, prefill, decode steps
        per_layer = {layer.layer: layer for layer in stats.layers}
        for layer in stats.layers:
            if layer.placement == "streamed":
                # Bytes are whole-layer copies: a multiple of the layer's packed size.
                assert layer.bytes_moved % engine.layer_bytes[layer.layer] == 0
                assert layer.bytes_moved >= engine.layer_bytes[layer.layer]
            else:
                assert per_layer[layer.layer].bytes_moved == 0
    else:
        assert stats.bytes_moved == 0 and stats.hits == 0
    # Detach restores the model exactly.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_tiny_config_tables_cover_every_registered_architecture() -> None:
    """A new table row cannot land without a test row: every registered architecture is matched
    by one tiny model of the matrix (dense or MoE), and every tiny model by exactly one row."""
    from conftest import TINY_MOE_CONFIGS

    from torus_plugins.plugins import resolve

    archs = resolve().architectures
    covered: set[str] = set()
    for name in list(TINY_CONFIGS) + list(TINY_MOE_CONFIGS):
        model = build_tiny(name)
        matching = [a.name for a in archs if a.matches(model)]
        assert matching, f"no registered architecture matches the tiny {name!r} model"
        covered.add(matching[0])
    # Structural discovery is asked last: a family no row knows (Cohere) is what covers it.
    torch.manual_seed(0)
    cohere = T.CohereForCausalLM(
        T.CohereConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    )
    assert [a.name for a in archs if a.matches(cohere)] == ["discovered"]
    covered.add("discovered")
    missing = {a.name for a in archs} - covered
    assert not missing, f"registered architectures without a tiny test model in conftest: {sorted(missing)}"
