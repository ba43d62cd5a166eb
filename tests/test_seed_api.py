"""`torus_sparse`: the seed project's API as an alias over TorusModel / TorusConfig (adapters/seed_api)."""

from __future__ import annotations

import pytest

from torus_plugins import ConfigError, TorusConfig
from torus_sparse import TorusSparseConfig, TorusSparseModel


def test_each_seed_field_maps_onto_torus_config():
    cfg = TorusSparseConfig(lookahead_horizon=3, vram_resident_fraction=0.25, weight_quant="int8",
                            moe_expert_prefetch_k=4, vram_budget="2GB", transport="copy")  # fmt: skip
    assert cfg.to_torus_config(num_layers=30) == TorusConfig(
        lookahead=3,
        resident_layers=8,
        weight_quant="int8",
        moe_expert_prefetch_k=4,
        vram_budget="2GB",
        transport="copy",
    )
    assert TorusSparseConfig().to_torus_config(None) == TorusConfig()  # the defaults are the library's
    assert TorusSparseConfig(weight_quant="none").to_torus_config(None).weight_quant is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pcie_buffer_mb": 256}, "pcie_buffer_mb=256 has no equivalent.*set lookahead_horizon"),
        ({"weight_quant": "fp8"}, "'none', 'int8' or 'int4'"),
        ({"vram_resident_fraction": 1.5}, "from 0 to 1"),
        ({"lookahead_horizon": 0}, "lookahead must be an integer >= 1"),
    ],
)
def test_a_field_that_cannot_apply_is_refused_with_the_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TorusSparseConfig(**kwargs)


def test_the_seed_snippet_generates_text_and_streams_pieces(smollm2_path):
    model = TorusSparseModel.from_pretrained(
        smollm2_path, config=TorusSparseConfig(lookahead_horizon=1, vram_resident_fraction=0.5, transport="copy")
    )
    text = model.generate("What is the capital of France?", max_new_tokens=12)
    assert isinstance(text, str) and "Paris" in text
    pieces = list(model.stream_generate("What is the capital of France?", max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == text
    s = model.stats()
    assert (s.resident_layers, s.streamed_layers) == (15, 15) and s.bytes_moved > 0 and s.misses == 0
    assert model.config.lookahead == 1
