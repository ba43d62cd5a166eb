"""`stats`: snapshots from a real attached engine add up, serialise and print what they hold."""

from __future__ import annotations

import json

import torch
from conftest import build_tiny

import torus_plugins as tp

PROMPT = torch.tensor([[5, 17, 3, 88, 41, 9]])


def test_dense_snapshot_totals_are_the_sum_of_its_layers() -> None:
    model = build_tiny("llama")
    # lookahead 1: two slots for three streamed layers, so every pass moves bytes
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=1, lookahead=1))
    engine.reset_stats()
    with torch.no_grad():
        model(PROMPT)
        model(PROMPT)
    st = engine.stats()
    streamed = [layer for layer in st.layers if layer.placement == "streamed"]
    assert len(streamed) == st.streamed_layers == 3
    assert [layer.placement for layer in st.layers].count("resident") == st.resident_layers == 1
    assert st.hits == sum(layer.hits for layer in st.layers)
    assert st.misses == sum(layer.misses for layer in st.layers)
    assert st.bytes_moved == sum(layer.bytes_moved for layer in st.layers) > 0
    assert st.forward_passes == 2 and st.hits + st.misses == 2 * 3
    assert st.hit_rate == st.hits / (st.hits + st.misses)
    d = json.loads(json.dumps(st.as_dict()))
    assert d["hit_rate"] == st.hit_rate and len(d["layers"]) == 4 and d["experts"] is None
    line = st.summary()
    assert "resident=1 streamed=3" in line and f"hits={st.hits}" in line and str(st) == line
    tp.detach(model)


def test_reset_zeroes_every_counter_but_keeps_the_placement() -> None:
    model = build_tiny("llama")
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0))
    with torch.no_grad():
        model(PROMPT)
    engine.reset_stats()
    st = engine.stats()
    assert (st.hits, st.misses, st.bytes_moved, st.stall_s, st.forward_passes) == (0, 0, 0, 0.0, 0)
    assert st.hit_rate == 1.0  # nothing asked yet: nothing missed
    assert st.streamed_layers == 4
    tp.detach(model)


def test_expert_totals_fold_into_the_engine_line() -> None:
    model = build_tiny("mixtral")
    engine = tp.attach(model, tp.TorusConfig(transport="copy", moe_cache_experts=8))
    engine.reset_stats()
    with torch.no_grad():
        model(PROMPT)
    st = engine.stats()
    ex = st.experts
    assert ex is not None and ex.cache_experts == 8 and ex.total_experts == 32
    assert ex.routed == sum(layer.routed for layer in ex.layers) == ex.hits + ex.misses
    assert st.hits == ex.hits and st.bytes_moved == ex.bytes_moved == ex.loads * ex.expert_bytes
    totals = json.loads(json.dumps(st.as_dict()))["experts"]
    assert totals["routed"] == ex.routed and totals["wasted_share"] == (
        ex.wasted_bytes / ex.bytes_moved if ex.bytes_moved else 0.0
    )
    assert "| experts: cache=8/32 (shared, next-use)" in st.summary()
    tp.detach(model)
