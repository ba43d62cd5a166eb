"""Incremental detokenization and stop strings (no model: the tokenizer only)."""

from __future__ import annotations

import pytest
import torch

from torus_adapters.server.detok import HoldBack, IncrementalDecoder, StopMatcher
from torus_adapters.server.sampling import RowSampler, SamplingParams, choose_tokens


def test_pieces_add_up_to_the_full_decode_and_never_split_a_character(smollm2_tokenizer):
    text = "Héllo wörld 🌍🚀 — naïve café, 東京."
    ids = smollm2_tokenizer(text)["input_ids"]
    dec = IncrementalDecoder(smollm2_tokenizer)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_matcher_finds_stops_across_pieces():
    m = StopMatcher(["\n\n", "END"])
    assert [m.push(p) for p in ("Hello", " E", "N", "D more")] == [None, None, None, 6]
    assert StopMatcher([]).push("anything") is None


def test_hold_back_never_shows_a_stop_string():
    h = HoldBack(["STOP"])
    shown = [h.push("abc S"), h.push("T"), h.push("x")]  # "ST" could begin STOP, then cannot
    assert shown == ["abc ", "", "STx"]
    h = HoldBack(["STOP"])
    assert h.push("ab ST") == "ab " and h.push("OP!", end=3) == ""
    h = HoldBack(["STOP"])
    assert h.push("ab S") == "ab " and h.finish() == "S"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300, seed=1),  # tiny temperatures must not overflow
        SamplingParams(temperature=2.0, top_p=1e-300, seed=1),
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(repetition_penalty=10.0, frequency_penalty=2.0, presence_penalty=-2.0),
    ],
)
def test_sampling_degenerate_settings_pick_a_valid_token(params):
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    row = RowSampler(params, prompt_ids=[3], device=torch.device("cpu"))
    (choice,) = choose_tokens(logits, [row])
    assert 0 <= choice.id < 4 and choice.logprob <= 0.0


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [
        [choose_tokens(logits, [r])[0].id for _ in range(5)]
        for r in (RowSampler(params, [], torch.device("cpu")) for _ in range(2))
    ]
    assert draws[0] == draws[1]
