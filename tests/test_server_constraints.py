"""The grammar mask as applied to logits: llguidance's bitmask decoded with plain torch ops."""

from __future__ import annotations

import torch

from torus_adapters.server.constraints import allowed_tokens


def test_bitmask_decodes_to_exactly_the_allowed_tokens() -> None:
    vocab = 100  # not a multiple of 32: the last word's high bits are padding
    allowed = {0, 1, 31, 32, 63, 64, 77, 99}
    words = [0] * ((vocab + 31) // 32)
    for t in allowed | {100, 127}:  # bits past the vocabulary must be ignored
        words[t // 32] |= 1 << (t % 32)
    # int32 two's complement, as llguidance stores bit 31
    bitmask = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in words]], dtype=torch.int32)
    got = allowed_tokens(bitmask, vocab)
    assert got.shape == (vocab,) and got.dtype == torch.bool
    assert set(torch.nonzero(got).flatten().tolist()) == allowed
