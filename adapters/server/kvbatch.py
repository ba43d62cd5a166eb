"""The KV cache of the sequences decoding together, kept as one left-padded batch.

Each sequence is prefilled alone (a long one in chunks, into `prefill_cache`), then joins: its
cache and the batch's are left-padded to the same length and stacked. The 2-D attention mask marks
the padding, so a row attends only to its own tokens, and each row's position ids count only its
own tokens; the maths a row sees is the one it would see alone. Finished rows are removed and
columns that have become padding in every row are trimmed. Caches with anything but plain
`DynamicLayer`s (sliding windows, linear attention) cannot be padded this way; the scheduler then
runs one sequence at a time.

The batch's layers are `GrowingLayer`s: a `DynamicLayer` appends with `torch.cat`, copying the
whole cache at every decode step (work and a fresh allocation that grow with the context: at
batch 8 and 200 tokens, about 12 ms of a 190 ms step on 2 CPU cores); a growing layer writes the
new column into a buffer with room for `HEADROOM` more tokens and copies only when that is full.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def batchable(model_config: Any) -> bool:
    """Whether this model's cache is made of plain `DynamicLayer`s (so rows can be padded and stacked)."""
    try:
        layers = DynamicCache(config=model_config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


#: Tokens a growing layer has room for before it reallocates (per row; a copy every HEADROOM steps).
HEADROOM = 256


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place: `keys` / `values` are views of the first tokens of
    buffers with room for `HEADROOM` more, so a decode step writes one column instead of copying
    the cache. Anything that replaces `keys` / `values` (crop, batch selection) is taken as the new
    contents at the next update."""

    def __init__(
        self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, reserve: int = 0
    ) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.reserve = reserve  # tokens the first buffer has room for (a prompt prefilled in chunks)
        if keys is not None and values is not None:
            self.update(keys, values)

    def _owned(self) -> bool:
        k = self._k
        return k is not None and self.keys.data_ptr() == k.data_ptr() and self.keys.shape[:2] == k.shape[:2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = n + key_states.shape[-2]
        if not self._owned() or end > self._k.shape[-2]:  # type: ignore[union-attr]
            room = max(end + HEADROOM, self.reserve)
            self._k, self._v = (
                self._grown(old, new, end, room) for old, new in ((self.keys, key_states), (self.values, value_states))
            )
        assert self._k is not None and self._v is not None
        self._k[:, :, n:end] = key_states
        self._v[:, :, n:end] = value_states
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    @staticmethod
    def _grown(old: torch.Tensor, new: torch.Tensor, end: int, room: int) -> torch.Tensor:
        buf = new.new_empty((*new.shape[:2], room, new.shape[-1]))
        if old.dim() == 4 and old.shape[-2]:
            buf[:, :, : old.shape[-2]] = old
        return buf


def growing_cache(layers: Any) -> DynamicCache:
    """A `DynamicCache` of `GrowingLayer`s holding `layers` ((keys, values, ...) per layer, as
    iterating a `DynamicCache` gives them)."""
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = [GrowingLayer(k, v) for k, v, *_ in layers], None
    return cache


def prefill_cache(model_config: Any, reserve: int) -> DynamicCache:
    """An empty cache for one sequence prefilled in chunks: growing layers with room for `reserve`
    tokens, so each chunk writes its columns in place (a `DynamicLayer` would copy the whole cache
    at every chunk). Only for `batchable` models; others get the model's own cache."""
    cache = DynamicCache(config=model_config)
    cache.layers = [GrowingLayer(reserve=reserve) for _ in cache.layers]
    cache.layer_class_to_replicate = None
    return cache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [n, 0]
    return F.pad(t, pad)


class BatchCache:
    """KV cache, padding mask and per-row lengths of the rows in the current decode batch."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # bool [rows, columns]; False = padding
        self.lengths: list[int] = []  # real tokens per row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, cache: Any, length: int) -> None:
        """Append a row: the cache of one sequence prefilled alone (batch 1, `length` tokens)."""
        device = next(iter(cache))[0].device
        row_mask = torch.ones(1, length, dtype=torch.bool, device=device)
        if self.cache is None:
            self.cache, self.mask, self.lengths = growing_cache(cache), row_mask, [length]
            return
        assert self.mask is not None
        width = max(self.mask.shape[1], length)
        grow, pad = width - self.mask.shape[1], width - length
        layers = [
            (
                torch.cat([_pad_left(k0, grow, 2), _pad_left(k1, pad, 2)]),
                torch.cat([_pad_left(v0, grow, 2), _pad_left(v1, pad, 2)]),
            )
            for (k0, v0, *_), (k1, v1, *_) in zip(self.cache, cache)
        ]
        self.cache = growing_cache(layers)
        self.mask = torch.cat([_pad_left(self.mask, grow, 1), _pad_left(row_mask, pad, 1)])
        self.lengths.append(length)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask and position ids for one decode step (one new token per row)."""
        assert self.mask is not None
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        positions = torch.tensor(self.lengths, device=mask.device)[:, None]
        return mask, positions

    def advance(self, cache: Any, mask: torch.Tensor) -> None:
        """Record a finished decode step (the model appended one column to every row)."""
        self.cache, self.mask = cache, mask
        self.lengths = [n + 1 for n in self.lengths]

    def remove(self, rows: Sequence[int]) -> None:
        """Drop finished rows and trim columns that are padding in every remaining row."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(self.rows) if i not in gone]
        if not keep:
            self.clear()
            return
        assert self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        lengths = [self.lengths[i] for i in keep]
        cut = self.mask.shape[1] - max(lengths)
        layers = [
            (k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:]) for k, v, *_ in self.cache
        ]
        self.cache = growing_cache(layers)
        self.mask = self.mask.index_select(0, index)[:, cut:]
        self.lengths = lengths

    def clear(self) -> None:
        self.cache, self.mask, self.lengths = None, None, []
