"""The device slot ring: a few device buffers that streamed FFN layers rotate through.

Each slot remembers which layer it holds and two fences: `ready` (the copy into it has landed)
and `free` (every kernel that read it has finished). A slot is refilled only after `free`, and
computed from only after `ready`; that is the whole ordering discipline, identical on CUDA and
the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .host_store import LayerLayout


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor
    layer: int | None = None
    ready: Any = None  # fence: the copy of `layer` has landed
    free: Any = None  # fence: the last readers of this slot have finished
    last_used: int = 0
    used_since_load: bool = False
    # (layer -> typed views of this slot's buffer in that layer's layout), built once per pair.
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class SlotRing:
    def __init__(self, buffers: list[torch.Tensor], layouts: list[LayerLayout]) -> None:
        self.slots = [Slot(i, b) for i, b in enumerate(buffers)]
        self._layouts = layouts
        self._where: dict[int, Slot] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self.slots)

    def find(self, layer: int) -> Slot | None:
        return self._where.get(layer)

    def views(self, slot: Slot, layer: int) -> list[torch.Tensor]:
        v = slot.views.get(layer)
        if v is None:
            v = slot.views[layer] = self._layouts[layer].views(slot.buffer)
        return v

    def victim(self, keep: frozenset[int] | set[int] | tuple[int, ...], active: Slot | None) -> Slot | None:
        """The slot to refill: empty first, else least recently used, never `active` nor one
        holding a layer in `keep`. None when every slot is protected."""
        best = None
        for s in self.slots:
            if s is active or (s.layer is not None and s.layer in keep):
                continue
            if s.layer is None:
                return s
            if best is None or s.last_used < best.last_used:
                best = s
        return best

    def assign(self, slot: Slot, layer: int, ready: Any) -> None:
        if slot.layer is not None:
            self._where.pop(slot.layer, None)
        slot.layer, slot.ready, slot.used_since_load = layer, ready, False
        self._where[layer] = slot

    def forget(self, slot: Slot) -> None:
        """Mark a slot empty (its copy failed or was abandoned): it must be reloaded before use."""
        if slot.layer is not None:
            self._where.pop(slot.layer, None)
        slot.layer, slot.ready = None, None

    def touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock
        slot.used_since_load = True

    def clear(self) -> None:
        for s in self.slots:
            self.forget(s)
