"""The grammar masks as applied to logits: llguidance's bitmask decoded with plain torch ops, one
bitmask for every constrained row of a batch."""

from __future__ import annotations

import json

import pytest
import torch

from torus_adapters.server.constraints import Grammars, allowed_tokens, grammar_masks
from torus_adapters.server.sampling import RowSampler, SamplingParams, choose_tokens

CPU = torch.device("cpu")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _words(allowed: set[int], vocab: int) -> list[int]:
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32 two's complement, as llguidance stores bit 31


def test_bitmask_decodes_to_exactly_the_allowed_tokens() -> None:
    vocab = 100  # not a multiple of 32: the last word's high bits are padding
    rows = [{0, 1, 31, 32, 63, 64, 77, 99}, {5, 98}]
    bitmask = torch.tensor([_words(r | {100, 127}, vocab) for r in rows], dtype=torch.int32)  # bits past the vocabulary
    got = allowed_tokens(bitmask, vocab)
    assert got.shape == (2, vocab) and got.dtype == torch.bool
    assert [set(torch.nonzero(g).flatten().tolist()) for g in got] == rows
    assert torch.equal(allowed_tokens(bitmask[0], vocab), got[0])  # one row: a 1-D bitmask


@pytest.fixture(scope="module")
def grammars(smollm2_tokenizer) -> Grammars:
    return Grammars(smollm2_tokenizer, len(smollm2_tokenizer), warm=False)


def test_grammar_masks_give_each_row_its_own_tokens_and_never_the_padding(grammars, smollm2_tokenizer) -> None:
    vocab = grammars.vocab_size
    person, anything = grammars.json_schema(SCHEMA, "s"), grammars.regex(r"[a-z]+", "r")
    rows = [grammars.start(person), grammars.start(anything)]
    allowed, errors = grammar_masks(rows, vocab + 64)  # an LM head wider than the vocabulary
    assert allowed.shape == (2, vocab + 64) and errors == [None, None]
    assert not allowed[:, vocab:].any()
    first = [smollm2_tokenizer.decode(torch.nonzero(row).flatten().tolist()[:200]) for row in allowed]
    assert first[0] and set(first[0]) <= set('{"')  # a JSON object starts with "{"
    assert first[1] and first[1].isalpha() and first[1].islower()
    assert allowed[0].sum() < 10 < allowed[1].sum()


def test_a_batch_of_constrained_and_free_rows_decodes_each_row_as_alone(grammars, smollm2_tokenizer) -> None:
    """Greedy and sampled rows, constrained or not, in one batch: each row's tokens are those it
    picks alone, and every constrained reply is valid."""
    person = grammars.json_schema(SCHEMA, "s")
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0.8, seed=4)]
    specs = [(params[0], True), (params[0], False), (params[1], True), (params[2], False)]

    def rows() -> list[RowSampler]:
        return [RowSampler(p, [1], CPU, grammars.start(person) if c else None) for p, c in specs]

    batch, alone = rows(), rows()
    logits = torch.randn(40, len(specs), grammars.vocab_size, generator=torch.Generator().manual_seed(0))
    got: list[list[int]] = [[] for _ in specs]
    for step in logits:
        live = [i for i, r in enumerate(batch) if r.constraint is None or not r.constraint.done]
        together = choose_tokens(step[live], [batch[i] for i in live])
        for i, choice in zip(live, together):
            (single,) = choose_tokens(step[i : i + 1], [alone[i]])
            assert (choice.id, choice.logprob) == pytest.approx((single.id, single.logprob), abs=1e-5)
            assert choice.logprob <= 0.0
            got[i].append(choice.id)
    for (_, constrained), ids in zip(specs, got):
        if constrained:
            value = json.loads(smollm2_tokenizer.decode(ids))
            assert set(value) == {"name", "age"} and isinstance(value["age"], int)
