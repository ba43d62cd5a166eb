"""Built-in prefetch policy for dense models: the next layers in execution order, wrapping around.

A decoder runs its layers in the same order every forward pass, so the next `lookahead` layers
are known exactly. Wrapping from the last layer to the first lets the next token's first
layers travel while the LM head, sampling and embedding run.
"""

from __future__ import annotations

from typing import Sequence

from ..hookspecs import hookimpl
from ..prefetch import PrefetchContext


class SequentialPrefetch:
    def __init__(self, ctx: PrefetchContext) -> None:
        order = ctx.streamed
        depth = min(ctx.lookahead + 1, ctx.n_slots, len(order))
        # Precompute every answer: the hot path is then one dict lookup.
        self._next = {
            layer: tuple(order[(pos + 1 + k) % len(order)] for k in range(depth)) for pos, layer in enumerate(order)
        }
        self._warm = tuple(order[:depth])

    def warmup(self) -> Sequence[int]:
        return self._warm

    def after(self, layer: int) -> Sequence[int]:
        return self._next[layer]


@hookimpl
def torus_register_prefetch_policies(register) -> None:
    register("sequential", SequentialPrefetch)
