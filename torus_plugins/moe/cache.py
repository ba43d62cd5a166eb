"""The device expert cache: slots of one expert each, shared by all MoE layers or split per layer.

It reuses the dense slot ring's fences and ordering rules (a slot is refilled only after its
readers finished, computed from only after its copy landed); what differs is the key (one routed
expert, not a whole FFN layer) and the eviction policy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..config import format_bytes
from ..errors import BudgetTooSmallError
from ..host_store import PackedLayer
from ..slots import Slot, SlotRing


class ExpertRing(SlotRing):
    """A slot ring keyed by expert unit, evicting by recency, routing frequency or next use.

    "lfu" keeps the experts routed most often since attach (ties: the least recently used goes),
    the policy published results say matters less than capacity: the benchmark measures both.
    "next-use" evicts an expert of the layer whose next run is furthest away (the layers run in
    a cycle, so that is the layer that just ran, then the one before), ties by frequency: LRU
    evicts exactly the experts needed soonest once a token's experts outgrow the cache.
    """

    def __init__(
        self,
        buffers: list[torch.Tensor],
        units: list[PackedLayer],
        policy: str,
        freq: list[int],
        unit_layer: list[int] | None = None,
        n_layers: int = 1,
    ) -> None:
        self.policy = policy
        self._freq = freq  # shared with the cache: routed count per unit
        self._unit_layer = unit_layer or [0] * len(units)
        self._n_layers = n_layers
        self.current = 0  # the MoE layer running now (set by the streamer)
        # "lfu" / "next-use": heaps of (frequency, last use, slot index, version) per MoE layer of
        # the unit held ("lfu": one heap for all), so a victim is found without a scan of the slots.
        # An entry whose version is not its slot's current one is stale and dropped when met.
        self._heaps: list[list[tuple[int, int, int, int]]] = [
            [] for _ in range(n_layers if policy == "next-use" else 1)
        ]
        super().__init__(buffers, units)

    def _rekey(self, slot: Slot) -> None:
        super()._rekey(slot)
        if self.policy == "lru" or slot.layer is None:
            return
        heap = self._heaps[self._unit_layer[slot.layer] if self.policy == "next-use" else 0]
        heapq.heappush(heap, (self._freq[slot.layer], slot.last_used, slot.index, slot.version))
        if len(heap) > 4 * len(self.slots) + 64:  # drop stale entries now and then
            heap[:] = [e for e in heap if self.slots[e[2]].version == e[3]]
            heapq.heapify(heap)

    def rekey_unit(self, unit: int) -> None:
        """`unit`'s routing frequency changed: re-key its slot, if it holds one."""
        slot = self.find(unit)
        if slot is not None:
            self._rekey(slot)

    def victim(self, keep, active: Slot | None) -> Slot | None:
        """Policy "lru": the ring's own order. "lfu": the least routed ("next-use": of the layer whose next
        run is furthest away: the current one, then the one before, and so on), ties by least
        recent use, then slot order, exactly as comparing every slot's key would choose."""
        if self.policy == "lru":
            return super().victim(keep, active)
        empty = self._empty_slot(active)
        if empty is not None:
            return empty
        if self.policy == "lfu":
            return self._pop_best(self._heaps[0], keep, active)
        n = self._n_layers
        for back in range(n):  # layers until their next run: n for the current one, then n - 1, ...
            found = self._pop_best(self._heaps[(self.current - back) % n], keep, active)
            if found is not None:
                return found
        return None

    def _pop_best(self, heap: list[tuple[int, int, int, int]], keep, active: Slot | None) -> Slot | None:
        """The heap's least key among live, unprotected slots (left in the heap: it is still the
        slot's current entry), or None; protected entries met on the way are put back."""
        skipped = []
        found = None
        while heap:
            entry = heap[0]
            s = self.slots[entry[2]]
            if s.version != entry[3] or s.layer is None:
                heapq.heappop(heap)
                continue
            if s is active or s.layer in keep:
                skipped.append(heapq.heappop(heap))
                continue
            found = s
            break
        for e in skipped:
            heapq.heappush(heap, e)
        return found


@dataclass(frozen=True)
class ExpertCachePlan:
    """How many experts the device cache holds and how they are split.

    slots: experts the cache holds in all; slot_bytes: device bytes of one slot (an expert's
    landing bytes, plus its dequantized copy when weights stream quantized); minimum: the fewest
    slots that can run (one layer's top-k, per layer with the "per-layer" scope).
    """

    slots: int
    slot_bytes: int
    scope: str
    n_layers: int
    total_experts: int
    minimum: int

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def per_ring(self) -> list[int]:
        if self.scope == "shared":
            return [self.slots]
        base, extra = divmod(self.slots, self.n_layers)
        return [base + (1 if j < extra else 0) for j in range(self.n_layers)]


def plan_expert_cache(
    experts_per_layer: list[int],
    top_k: list[int],
    slot_bytes: int,
    scope: str,
    requested: int | None,
    available_bytes: int | None,
) -> ExpertCachePlan:
    """Size the cache: `requested` experts if given, else what `available_bytes` holds (every
    expert when there is no budget). Raises `BudgetTooSmallError` naming the minimum."""
    total = sum(experts_per_layer)
    n_layers = len(experts_per_layer)
    minimum = max(top_k) if scope == "shared" else max(top_k) * n_layers
    if requested is not None:
        slots, why = requested, f"moe_cache_experts={requested}"
    elif available_bytes is not None:
        slots = max(0, available_bytes) // max(slot_bytes, 1)
        why = f"the {format_bytes(max(0, available_bytes))} the budget leaves for experts holds {slots}"
    else:
        slots, why = total, ""
    slots = min(slots, total)
    if slots < minimum:
        need = (
            f"one layer's top-{max(top_k)}" if scope == "shared" else f"top-{max(top_k)} for each of {n_layers} layers"
        )
        raise BudgetTooSmallError(
            f"the MoE expert cache is too small: {why}, but the minimum is {minimum} experts "
            f"({format_bytes(minimum * slot_bytes)}, {need} of {format_bytes(slot_bytes)} each). "
            f"Raise moe_cache_experts or vram_budget"
            + (", or use moe_cache_scope='shared'." if scope == "per-layer" else "."),
            minimum * slot_bytes,
        )
    return ExpertCachePlan(slots, slot_bytes, scope, n_layers, total, minimum)


class ExpertCache:
    """The rings of one attached model: one shared ring, or one per MoE layer."""

    def __init__(
        self,
        plan: ExpertCachePlan,
        buffers: list[torch.Tensor],
        units: list[PackedLayer],
        policy: str,
        unit_layer: list[int] | None = None,
    ):
        self.plan = plan
        #: routed count per expert unit since attach (read by "lfu" eviction)
        self.freq = [0] * len(units)
        rings, at = [], 0
        for n in plan.per_ring():
            rings.append(ExpertRing(buffers[at : at + n], units, policy, self.freq, unit_layer, plan.n_layers))
            at += n
        self._rings = rings
        self._ring_of = rings * plan.n_layers if plan.scope == "shared" else rings

    def ring(self, layer: int) -> ExpertRing:
        return self._ring_of[layer]

    def routed(self, unit: int, layer: int) -> None:
        """Count one routing of `unit` (of MoE layer `layer`): "lfu" and "next-use" re-key its slot."""
        self.freq[unit] += 1
        ring = self._ring_of[layer]
        if ring.policy != "lru":
            ring.rekey_unit(unit)

    def enter(self, layer: int) -> None:
        """Tell the rings which MoE layer runs now (the "next-use" policy measures from it)."""
        for r in self._rings:
            r.current = layer

    @property
    def rings(self) -> list[ExpertRing]:
        return self._rings

    def clear(self) -> None:
        for r in self._rings:
            r.clear()
