"""`chunk_attention`: a prompt's later prefill chunks attend without repeating the cache's grouped
key/value heads, with the same numbers as transformers' SDPA path, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations import sdpa_attention

from torus_adapters.server.chunk_attention import chunk_attention, sdpa_configs
from torus_adapters.server.kvbatch import prefill_cache


def _chunked_logits(model, ids: torch.Tensor, size: int, configs: list) -> list[torch.Tensor]:
    cache, logits = prefill_cache(model.config, ids.shape[1]), []
    for done in range(0, ids.shape[1], size):
        chunk = ids[:, done : done + size]
        with torch.inference_mode(), chunk_attention(configs if done else []):
            out = model(
                input_ids=chunk,
                attention_mask=torch.ones(1, done + chunk.shape[1], dtype=torch.long),
                cache=cache,
                use_cache=True,
            )
        cache = out.cache
        logits.append(out.logits)
    return logits


def test_later_chunks_skip_repeat_kv_and_match_the_sdpa_path(tiny_llama, monkeypatch):
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads  # grouped heads
    configs = sdpa_configs(tiny_llama)
    assert configs == [tiny_llama.config]
    ids = torch.arange(5, 5 + 70)[None] % tiny_llama.config.vocab_size

    repeats = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: repeats.append(h.shape) or real(h, n))
    stock = _chunked_logits(tiny_llama, ids, 16, [])
    assert repeats  # transformers' path copies the whole cache per layer for every masked chunk
    repeats.clear()
    switched = _chunked_logits(tiny_llama, ids, 16, configs)
    assert repeats == []
    for a, b in zip(switched, stock, strict=True):
        assert torch.equal(a, b)
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_the_attention_is_restored_when_a_pass_raises(tiny_llama):
    configs = sdpa_configs(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"), chunk_attention(configs):
        assert tiny_llama.config._attn_implementation != "sdpa"
        raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == "sdpa"
