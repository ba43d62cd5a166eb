"""The residency plan: which FFN layers stay on the device, which stream, and how big the ring is.

Order of claims on the device budget: non-FFN weights (always resident), the KV-cache reserve,
the slot ring (only if something streams), then whole FFN layers while they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import format_bytes
from ..errors import BudgetTooSmallError, ConfigError


@dataclass(frozen=True)
class ResidencyPlan:
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    n_slots: int
    slot_bytes: int  # bytes of one slot (the largest streamed layer)
    non_ffn_bytes: int
    kv_reserve_bytes: int
    budget_bytes: int | None

    @property
    def ring_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def device_bytes(self, layer_bytes: list[int]) -> int:
        """Planned device bytes: non-FFN + resident FFN layers + ring (KV reserve excluded)."""
        return self.non_ffn_bytes + sum(layer_bytes[i] for i in self.resident) + self.ring_bytes


def spread(k: int, n: int) -> tuple[int, ...]:
    """k indices out of range(n), evenly spaced, so streamed layers alternate with resident ones
    and each copy gets a resident layer's compute time to hide behind."""
    if k <= 0:
        return ()
    if k >= n:
        return tuple(range(n))
    return tuple(sorted({int((j + 0.5) * n / k) for j in range(k)}))


def plan_residency(
    layer_bytes: list[int],
    non_ffn_bytes: int,
    kv_reserve_bytes: int,
    budget_bytes: int | None,
    lookahead: int,
    resident_layers: int | None = None,
    slot_layer_bytes: list[int] | None = None,
) -> ResidencyPlan:
    """Decide residency. `resident_layers` overrides the budget's choice.

    slot_layer_bytes: what one slot needs to hold each layer when it streams (default: its
    `layer_bytes`; more when quantized weights land next to their dequantized copy).

    Raises `BudgetTooSmallError` (naming the minimum) when the budget cannot hold the non-FFN
    weights, the KV reserve and the slot ring.
    """
    slot_need = layer_bytes if slot_layer_bytes is None else slot_layer_bytes
    n = len(layer_bytes)
    if resident_layers is not None and resident_layers > n:
        raise ConfigError(f"resident_layers={resident_layers} but the model has only {n} FFN layers")

    def make(k: int) -> ResidencyPlan:
        resident = spread(k, n)
        streamed = tuple(i for i in range(n) if i not in set(resident))
        n_slots = min(lookahead + 1, len(streamed))
        slot = max((slot_need[i] for i in streamed), default=0)
        return ResidencyPlan(resident, streamed, n_slots, slot, non_ffn_bytes, kv_reserve_bytes, budget_bytes)

    if resident_layers is not None:
        return make(resident_layers)
    if budget_bytes is None:
        return make(n)
    # Cost is not monotonic in k (the ring shrinks or vanishes as layers become resident, and
    # layer sizes may differ), so price every k and keep the largest that fits.
    plans = [make(k) for k in range(n + 1)]
    costs = [p.device_bytes(layer_bytes) + kv_reserve_bytes for p in plans]
    for k in range(n, -1, -1):
        if costs[k] <= budget_bytes:
            return plans[k]
    cheapest = min(range(n + 1), key=lambda k: costs[k])
    minimum, ring = costs[cheapest], plans[cheapest]
    raise BudgetTooSmallError(
        f"vram_budget {format_bytes(budget_bytes)} is too small: the minimum is {format_bytes(minimum)} "
        f"({minimum} bytes) = non-FFN weights {format_bytes(non_ffn_bytes)} + KV reserve "
        f"{format_bytes(kv_reserve_bytes)} + {len(ring.resident)} resident FFN layers + slot ring "
        f"{ring.n_slots} × {format_bytes(ring.slot_bytes)}. "
        f"Raise vram_budget, lower lookahead, or lower kv_reserve_tokens.",
        minimum,
    )
