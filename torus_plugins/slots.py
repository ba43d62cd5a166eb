"""The device slot ring: a few device buffers that streamed FFN layers rotate through.

Each slot remembers which layer it holds and two fences: `ready` (the copy into it has landed)
and `free` (every kernel that read it has finished). A slot is refilled only after `free`, and
computed from only after `ready`; that is the whole ordering discipline, identical on CUDA and
the CPU.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import TransferError
from .host_store import PackedLayer, materialize
from .transfer import PendingStall, Transport

#: View sets a slot caches. Units with equal layouts (every expert of a MoE layer, usually every
#: FFN layer) share one set per slot: views depend on the layout, not on the bytes. Views of a
#: transport's aliased host bytes are per unit. The cache keeps the most recent sets: rebuilding
#: one costs a few microseconds and 3 dispatched ops per tensor.
VIEWS_PER_SLOT = 16


@dataclass(frozen=True)
class SlotViews:
    """A layer's tensors inside one slot, built once per (slot, layer) pair.

    bind: what the parameters point at while the layer computes.
    transfer: the landed bytes, typed (the same tensors as `bind` when nothing is quantized).
    dequantize: whether `bind` must be filled from `transfer` after each landing.
    """

    bind: list[torch.Tensor]
    transfer: list[torch.Tensor]
    packed: PackedLayer
    dequantize: bool


def _geometry(packed: PackedLayer) -> tuple:
    """What a slot's views of `packed` depend on: every tensor's dtype, shape, strides and place
    in both layouts, and the recipe (not the tensors' names: experts differ only by those)."""

    def layout(lay):  # noqa: ANN001, ANN202
        return lay.nbytes, tuple((t.dtype, t.shape, t.stride, t.offset, t.nbytes) for t in lay.tensors)

    return layout(packed.compute), layout(packed.transfer), packed.recipe


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor
    layer: int | None = None
    ready: Any = None  # fence: the copy of `layer` has landed
    free: Any = None  # fence: the last readers of this slot have finished
    last_used: int = 0
    used_since_load: bool = False
    prefetched: bool = False  # loaded on a prediction (MoE experts): unused at eviction = wasted bytes
    # The unit whose dequantized weights fill the compute area since its landing: a cache hit
    # binds them as they are (dequantizing is most of a quantized unit's cost on a CPU).
    materialized: int | None = None
    views: dict[Any, SlotViews] = field(default_factory=dict)  # by layout (see SlotRing.views)
    version: int = 0  # bumped whenever the slot's eviction key changes (heap entries of older versions are stale)


class SlotRing:
    def __init__(self, buffers: list[torch.Tensor], layers: list[PackedLayer]) -> None:
        """buffers: one uint8 device buffer per slot; layers: the layout of each unit (an FFN
        layer, or one expert) the ring may hold. Quantized units land at the start of a slot and
        are dequantized right after their landing area."""
        self.slots = [Slot(i, b) for i, b in enumerate(buffers)]
        self._layers = layers
        # Each unit's layout as the index of the first with the same bytes (tensor names aside):
        # hashed once, here.
        first: dict[tuple, int] = {}
        self._layout_key = [first.setdefault(_geometry(p), len(first)) for p in layers]
        self._where: dict[int, Slot] = {}
        self._clock = 0
        # Eviction without scanning the slots: every slot in least-recently-used order (touch
        # moves one to the end, as its `last_used` becomes the largest), and a heap of empty slot
        # indices (entries for slots filled since are skipped when met).
        self._recency: OrderedDict[int, Slot] = OrderedDict((s.index, s) for s in self.slots)
        self._empty = [s.index for s in self.slots]

    def __len__(self) -> int:
        return len(self.slots)

    def find(self, layer: int) -> Slot | None:
        return self._where.get(layer)

    def views(self, slot: Slot, layer: int, source: torch.Tensor | None = None) -> SlotViews:
        """The layer's tensors in `slot`. `source`: read the landed bytes there instead of the
        slot (a transport that aliases the host store, see `Transport.aliases_source`)."""
        key: Any = self._layout_key[layer] if source is None else ("unit", layer)
        v = slot.views.get(key)
        if v is None:
            if len(slot.views) >= VIEWS_PER_SLOT:
                del slot.views[next(iter(slot.views))]  # the oldest
            # Views outlive the pass that made them: never make them inference tensors.
            with torch.inference_mode(False):
                v = slot.views[key] = self._make_views(slot.buffer, self._layers[layer], source)
        return v

    @staticmethod
    def _make_views(buffer: torch.Tensor, packed: PackedLayer, source: torch.Tensor | None = None) -> SlotViews:
        transfer = packed.transfer.views(buffer if source is None else source)
        if not packed.quantized:
            return SlotViews(transfer, transfer, packed, False)
        compute = packed.compute.views(buffer[packed.transfer.nbytes :])
        # Unquantized tensors (biases) are used where they landed; only weights are dequantized.
        bind = [transfer[ti] if mode == "raw" else compute[k] for k, (mode, ti, _) in enumerate(packed.recipe)]
        return SlotViews(bind, transfer, packed, True)

    @torch.inference_mode(False)  # the slot slice outlives this pass: never an inference tensor
    def fill(self, slot: Slot, unit: int, src: torch.Tensor, transport: Transport) -> int:
        """Start copying `unit`'s host bytes into `slot`, after the slot's last readers; returns
        the bytes moved."""
        ready = transport.copy(slot.buffer[: src.numel()], src, slot.free)
        self.assign(slot, unit, ready)
        return src.numel()

    def land(
        self, slot: Slot, unit: int, transport: Transport, source: torch.Tensor | None, what: str
    ) -> tuple[SlotViews, float | PendingStall]:
        """Make compute wait for `slot`'s copy of `unit`, then return its views (dequantized
        into the slot's compute area when it streams quantized) and the wait.

        A failed copy empties the slot, so nothing ever computes from a half-written one; `what`
        names the unit in the error ("FFN layer 3", "expert 5 of MoE layer 2").
        """
        try:
            waited = transport.wait(slot.ready)
        except BaseException as exc:
            self.forget(slot)
            if isinstance(exc, TransferError) or not isinstance(exc, Exception):
                raise
            raise TransferError(f"copying {what} to the device failed: {exc}") from exc
        views = self.views(slot, unit, source)
        if views.dequantize and slot.materialized != unit:
            # On the compute stream, after the wait above: reads the landed bytes, writes the
            # slot's compute area. The slot's free fence (set at release) covers this read too.
            # Once per landing: `assign`/`forget` clear the mark when the slot takes other bytes.
            materialize(views.packed, views.transfer, views.bind)
            slot.materialized = unit
        return views, waited

    def victim(self, keep: frozenset[int] | set[int] | tuple[int, ...], active: Slot | None) -> Slot | None:
        """The slot to refill: empty first (the lowest index), else least recently used, never
        `active` nor one holding a layer in `keep`. None when every slot is protected. Costs the
        protected slots it steps over, not a scan of the ring."""
        empty = self._empty_slot(active)
        if empty is not None:
            return empty
        for s in self._recency.values():
            if s is not active and not (s.layer is not None and s.layer in keep):
                return s
        return None

    def _empty_slot(self, active: Slot | None) -> Slot | None:
        """The lowest-index empty slot other than `active` (heap entries of since-filled slots go)."""
        heap = self._empty
        while heap and self.slots[heap[0]].layer is not None:
            heapq.heappop(heap)
        if not heap:
            return None
        first = self.slots[heap[0]]
        if first is not active:
            return first
        return next((self.slots[i] for i in sorted(heap) if i != first.index and self.slots[i].layer is None), None)

    def assign(self, slot: Slot, layer: int, ready: Any) -> None:
        if slot.layer is not None:
            self._where.pop(slot.layer, None)
        slot.layer, slot.ready, slot.used_since_load = layer, ready, False
        slot.materialized = None
        self._where[layer] = slot
        self._rekey(slot)

    def forget(self, slot: Slot) -> None:
        """Mark a slot empty (its copy failed or was abandoned): it must be reloaded before use."""
        if slot.layer is not None:
            self._where.pop(slot.layer, None)
            heapq.heappush(self._empty, slot.index)
        slot.layer, slot.ready, slot.materialized = None, None, None
        self._rekey(slot)

    def touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock
        slot.used_since_load = True
        self._recency.move_to_end(slot.index)
        self._rekey(slot)

    def _rekey(self, slot: Slot) -> None:
        """The slot's eviction key changed (its unit or its last use): policies that keep their own
        order (`moe.cache.ExpertRing`) update it here."""
        slot.version += 1

    def clear(self) -> None:
        for s in self.slots:
            self.forget(s)
