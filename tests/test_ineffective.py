"""Settings that cannot take effect say so: one warning at attach and `stats().ineffective`, while
the model still computes exactly what the plain one does."""

from __future__ import annotations

import logging

import torch
from conftest import build_tiny

import torus_plugins as tp

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def _attach_and_compare(caplog, **cfg) -> tuple[str, ...]:
    model = build_tiny("llama")
    with torch.no_grad():
        ref = model(PROMPT).logits
    with caplog.at_level(logging.WARNING, logger="torus_plugins"):
        engine = tp.attach(model, **cfg)
    with torch.no_grad():
        out = model(PROMPT).logits
    ineffective = engine.stats().ineffective
    tp.detach(model)
    for why in ineffective:
        assert caplog.text.count(why) == 1  # said once, at attach
    if cfg.get("weight_quant") is None:
        assert torch.equal(out, ref)
    return ineffective


def test_quantizing_layers_that_all_stay_resident_says_it_saves_nothing(caplog):
    # No budget on a CPU: every FFN layer fits, so all are resident (dequantized once).
    (why,) = _attach_and_compare(caplog, transport="copy", weight_quant="int8")
    assert why.startswith("weight_quant='int8' saves nothing here: all 4 FFN layers stay resident on cpu")
    assert "set vram_budget or resident_layers" in why


def test_a_host_placement_the_cost_model_turns_off_says_so(caplog):
    # A link far faster than this host's memory: streaming wins at every token count.
    (why,) = _attach_and_compare(
        caplog, transport="copy", resident_layers=0, host_compute="all", options={"link_bandwidth": "1000TB/s"}
    )
    assert why.startswith("host_compute='all' takes no effect: streaming a layer over the link (1000000.0 GB/s)")
    assert why.endswith("set host_max_tokens=1 to compute decode steps on the host anyway")


def test_settings_that_act_report_nothing(caplog):
    assert _attach_and_compare(caplog, transport="copy", resident_layers=0, weight_quant="int8") == ()
    assert _attach_and_compare(caplog, transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1) == ()
