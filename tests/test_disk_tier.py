"""The disk tier: with `host_budget` below the host store's size the store lives in its file,
memory-mapped, read ahead and paged out around a bounded resident set -- same tokens as the
unwrapped model, the process's share of the mapping within the budget, clear refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, build_tiny

import torus_plugins as tp
from torus_plugins.lifecycle import is_attached

KW = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
#: a page fault maps up to 64 KiB of cached neighbours too ("fault-around"); the tier sweeps them
#: once per as many page-outs as it keeps units, so that many faults' worth can be mapped between sweeps
FAULT_AROUND = 64 * 1024


def _mapped_rss(directory: Path) -> int:
    """Resident bytes of this process's mappings of the store files in `directory` (smaps)."""
    paths = {str(p) for p in directory.glob("*.store")}
    total, hit = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
            hit = len(parts) >= 6 and parts[5] in paths
        elif hit and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


def _minimum(name: str, **config) -> int:
    with pytest.raises(tp.BudgetTooSmallError) as info:
        tp.attach(build_tiny(name), tp.TorusConfig(host_budget=1, **config))
    return info.value.minimum_bytes


@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("name", ["llama", "olmoe"])
def test_a_store_larger_than_the_budget_decodes_from_disk(tmp_path: Path, name: str, quant: str | None) -> None:
    want = build_tiny(name).generate(PROMPT, **KW)
    config = dict(transport="copy", resident_layers=0, weight_quant=quant, store_cache=str(tmp_path))
    budget = _minimum(name, **config) + 4096
    model = build_tiny(name)
    engine = tp.attach(model, tp.TorusConfig(host_budget=budget, **config))
    stores = [s for s in (engine.store, engine.experts.store if engine.experts else None) if s and s.tier]
    assert sum(s.nbytes for s in stores) > budget  # the store really is larger than the budget
    assert torch.equal(model.generate(PROMPT, **KW), want)
    assert sum(s.tier.paged_out for s in stores) > 0
    if name == "llama":
        assert engine.store.tier.read_ahead > 0
    interval = max(max(8, len(s.tier._resident)) for s in stores)
    assert 0 < _mapped_rss(tmp_path) <= budget + interval * FAULT_AROUND
    assert engine.stats().ineffective == ()
    # A second attach maps the file it finds (no re-packing) and decodes the same.
    tp.detach(model)
    again = build_tiny(name)
    tp.attach(again, tp.TorusConfig(host_budget=budget, **config))
    assert torch.equal(again.generate(PROMPT, **KW), want)


def test_lean_load_with_a_disk_tier(tmp_path: Path) -> None:
    from torus_adapters.transformers_adapter.lean_load import load_lean

    build_tiny("qwen3_moe").save_pretrained(tmp_path / "ckpt")
    want = build_tiny("qwen3_moe").generate(PROMPT, **KW)
    config = dict(transport="copy", resident_layers=0, weight_quant="int4", store_cache=str(tmp_path / "stores"))
    budget = _minimum("qwen3_moe", **config) + 8192
    model = load_lean(tmp_path / "ckpt")
    tp.attach(model, tp.TorusConfig(host_budget=budget, **config))
    ref = build_tiny("qwen3_moe")
    tp.attach(ref, tp.TorusConfig(**{**config, "store_cache": None}))
    assert torch.equal(model.generate(PROMPT, **KW), ref.generate(PROMPT, **KW))
    assert want.shape == ref.generate(PROMPT, **KW).shape


def test_a_budget_below_the_working_set_is_refused_with_the_number() -> None:
    model = build_tiny("llama")
    with pytest.raises(tp.BudgetTooSmallError, match=r"minimum working set of 72\.0 KiB .*lookahead \+ 1"):
        tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0, host_budget="40KiB"))
    assert not is_attached(model)
    assert all(not p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (dict(transport="zero-copy"), "zero-copy"),
        (dict(transport="copy", host_compute="all"), "host_compute='off'"),
        (dict(transport="copy", store_cache=None), "set store_cache"),
    ],
)
def test_settings_the_disk_tier_cannot_work_with_are_refused(config: dict, why: str) -> None:
    with pytest.raises(tp.ConfigError, match=why):
        tp.attach(build_tiny("llama"), tp.TorusConfig(host_budget="50KiB", **config))


def test_a_budget_above_the_store_says_it_does_nothing(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    model = build_tiny("llama")
    with caplog.at_level(logging.WARNING, logger="torus_plugins"):
        engine = tp.attach(model, tp.TorusConfig(transport="copy", host_budget="1GiB", store_cache=str(tmp_path)))
    assert engine.store.tier is None and engine.disk_shares is None
    (why,) = engine.stats().ineffective
    assert "host_budget=1.0 GiB takes no effect" in why
    assert any("host_budget" in r.getMessage() for r in caplog.records)


def test_the_store_cannot_be_written_fails_attach_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = build_tiny("llama")
    want = build_tiny("llama").generate(PROMPT, **KW)
    config = tp.TorusConfig(transport="copy", resident_layers=0, host_budget="80KiB", store_cache=str(blocker / "x"))
    with pytest.raises(tp.TorusError, match="writing it to .* failed"):
        tp.attach(model, config)
    assert not is_attached(model)
    assert torch.equal(model.generate(PROMPT, **KW), want)  # every weight back where it was


def test_host_budget_is_parsed_and_checked() -> None:
    assert tp.TorusConfig(host_budget="2GiB").host_budget == 2 * 1024**3
    with pytest.raises(tp.ConfigError, match="host_budget"):
        tp.TorusConfig(host_budget="lots")
