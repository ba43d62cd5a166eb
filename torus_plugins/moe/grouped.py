"""The device expert cache as fused experts: what lets an MoE layer run its batched implementation.

Every slot of the cache lives in one device allocation, `stride` bytes apart, and every expert
shares one byte layout; so each of an expert's tensors, taken in all slots at once, is one strided
`[slots, ...]` tensor: the shape of the model's fused `[experts, ...]` parameter, with slots for
experts. A device-side table maps expert units to slots. An MoE layer whose routed experts all sit
in the cache then runs the model's own batched function (`ExpertSite.grouped`, e.g. transformers'
grouped_mm) on a stand-in whose fused parameters are these stacks, with `top_k_index` mapped
through the table: one gather, no host sync, no per-expert loop, and the unwrapped model's
arithmetic (groups are the same rows, only numbered by slot).
"""

from __future__ import annotations

import torch

from ..slots import SlotRing
from ..transfer import Transport

#: bytes between two slots' starts: a multiple of every dtype's size and of 16-byte vector loads
SLOT_ALIGN = 256


class SlotStack:
    """One allocation for all slots; views of every slot's tensors at once.

    block: the allocation; buffers: each slot's `slot_bytes` (what the ring copies into);
    table: expert unit -> slot, on the device (written when a slot takes a unit, read by the
    grouped path with one gather)."""

    def __init__(self, transport: Transport, slots: int, slot_bytes: int, units: int, device: torch.device) -> None:
        self.slots = slots
        self.stride = -(-max(slot_bytes, 1) // SLOT_ALIGN) * SLOT_ALIGN
        self.block = transport.alloc(self.stride * slots)
        self.buffers = [self.block[i * self.stride : i * self.stride + slot_bytes] for i in range(slots)]
        with torch.inference_mode(False):  # read by every later pass: never an inference tensor
            self.table = torch.zeros(units, dtype=torch.int64, device=device)

    def slot_of(self, buffer: torch.Tensor) -> int:
        """The index, among all slots, of the slot whose buffer is `buffer`."""
        return (buffer.data_ptr() - self.block.data_ptr()) // self.stride

    @torch.inference_mode(False)
    def stacked(self, packed) -> list[torch.Tensor]:  # noqa: ANN001 - a PackedLayer
        """`[slots, ...]` views of each tensor the unit layout `packed` binds (the compute area's
        dequantized weights for a quantized layout, the landed tensors otherwise)."""
        bind = SlotRing._make_views(self.buffers[0], packed).bind
        base = self.block.data_ptr()
        out = []
        for t in bind:
            size = t.element_size()
            offset = t.data_ptr() - base
            if offset % size or self.stride % size:
                raise ValueError(f"a {t.dtype} tensor at byte {offset} of a slot cannot be stacked")
            typed = self.block.view(t.dtype)
            out.append(typed.as_strided((self.slots, *t.shape), (self.stride // size, *t.stride()), offset // size))
        return out

    def assign(self, unit: int, buffer: torch.Tensor) -> None:
        """Unit `unit` now lives in the slot of `buffer` (two dispatched ops, on the compute
        stream: ordered before any later read of the table)."""
        self.table[unit] = self.slot_of(buffer)
