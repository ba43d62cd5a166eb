"""`planning.sizes.measure`: byte counts from shapes, equal on a loaded and a meta-device model."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import TINY_CONFIGS, build_tiny

from torus_plugins.errors import ConfigError
from torus_plugins.planning.sizes import measure
from torus_plugins.plugins import resolve


def _arch(model):
    return next(a for a in resolve().architectures if a.matches(model))


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_meta_model_measures_like_the_loaded_one(quant) -> None:
    loaded = build_tiny("llama")
    with torch.device("meta"):
        meta = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    a, b = measure(loaded, _arch(loaded), quant, 16), measure(meta, _arch(meta), quant, 16)
    assert a.layer_bytes == b.layer_bytes and a.transfer_bytes == b.transfer_bytes
    assert a.non_ffn_bytes == b.non_ffn_bytes and a.kv_bytes_per_token == b.kv_bytes_per_token


def test_ffn_and_non_ffn_bytes_partition_the_model() -> None:
    model = build_tiny("llama")
    sizes = measure(model, _arch(model))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    assert sizes.ffn_bytes + sizes.non_ffn_bytes <= total  # alignment padding aside, nothing twice
    ffn = sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.mlp.parameters())
    assert ffn <= sizes.ffn_bytes < ffn + 256 * 3 * len(model.model.layers)  # ALIGN per tensor at most
    assert sizes.non_ffn_bytes == total - ffn
    assert sizes.positions == [0, 1, 2, 3] and sizes.shared == ()


def test_quantized_transfers_are_smaller_and_slots_hold_both_layouts() -> None:
    model = build_tiny("llama")
    plain = measure(model, _arch(model))
    q = measure(model, _arch(model), "int8")
    assert all(t < p for t, p in zip(q.transfer_bytes, plain.transfer_bytes))
    assert q.slot_bytes == [t + c for t, c in zip(q.transfer_bytes, q.layer_bytes)]
    assert plain.slot_bytes == plain.transfer_bytes


def test_a_model_whose_every_ffn_is_shared_is_refused() -> None:
    model = build_tiny("llama")
    for layer in model.model.layers:
        layer.mlp = model.model.layers[0].mlp
    with pytest.raises(ConfigError, match="shares its weights"):
        measure(model, _arch(model))
