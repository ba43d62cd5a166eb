"""Attach says what it is doing: one record per step on `torus_plugins.progress` (with phase,
done, total and elapsed_s), counts while a step runs, and the `progress(done, total)` callback."""

from __future__ import annotations

import logging

from conftest import build_tiny

import torus_plugins as tp
import torus_plugins.progress as progress


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "torus_plugins.progress"]


def test_every_step_of_a_quantized_moe_attach_is_announced(caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # every count, not one per 5 s
    calls: list[tuple[int, int]] = []
    with caplog.at_level(logging.INFO, logger="torus_plugins.progress"):
        model = build_tiny("mixtral")
        tp.attach(
            model,
            transport="copy",
            weight_quant="int4",
            moe_cache_experts=8,
            store_cache=tmp_path,
            progress=lambda d, t: calls.append((d, t)),
        )
        tp.detach(model)
        model = build_tiny("mixtral")
        tp.attach(model, transport="copy", weight_quant="int4", moe_cache_experts=8, store_cache=tmp_path)
        tp.detach(model)
    phases = [r.phase for r in _records(caplog)]
    first = [
        "looking for a stored copy of the quantized experts",
        "quantizing experts to int4",
        "writing the int4 expert store",
    ]
    second = ["looking for a stored copy of the quantized experts", "reading experts from the int4 store file"]
    assert list(dict.fromkeys(phases)) == first + second[1:]
    counts = [(r.done, r.total) for r in _records(caplog) if r.phase == "quantizing experts to int4"]
    assert counts[0] == (0, 4) and counts[-1] == (4, 4) and (2, 4) in counts
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the callback still sees every MoE layer
    ends = [r for r in _records(caplog) if r.getMessage().endswith(" s") and "done in" in r.getMessage()]
    assert len(ends) == 5 and all(r.elapsed_s >= 0 for r in ends)


def test_a_dense_attach_counts_its_layers(caplog):
    with caplog.at_level(logging.INFO, logger="torus_plugins.progress"):
        model = build_tiny("llama")
        tp.attach(model, transport="copy", resident_layers=0)
        tp.detach(model)
    (start, end) = _records(caplog)
    assert start.getMessage() == "torus-sparse: packing FFN layers into the host store…"
    assert end.getMessage().startswith("torus-sparse: packing FFN layers into the host store: 4/4 done in ")
