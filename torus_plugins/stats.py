"""Counters the engine keeps per FFN layer, and the snapshot users read with `stats()`.

The hot path only adds to plain lists of numbers; everything else (totals, rates, formatting)
happens when a snapshot is taken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import format_bytes


@dataclass
class LayerCounters:
    """Mutable per-layer counters, updated on the hot path."""

    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0


@dataclass(frozen=True)
class LayerStats:
    """One FFN layer's counters at snapshot time."""

    layer: int
    placement: str  # "resident", "streamed" or "zero-copy"
    hits: int
    misses: int
    bytes_moved: int
    stall_s: float


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters.

    hits: streamed layers whose weights were already in a slot (or on their way) when needed.
    misses: streamed layers loaded synchronously because no prefetch had been issued for them.
    bytes_moved: host→device bytes copied for FFN weights since attach (or the last reset).
    stall_s: time compute waited for FFN weights.
    forward_passes: passes through the streamed layers (0 when nothing streams).
    resident_bytes: device bytes held permanently for FFN layers.
    ring_bytes: device bytes of the slot ring (all slots).
    peak_device_bytes: on CUDA, the peak allocated device memory since attach or the last
        `reset_stats()` (process-wide, as `torch.cuda.max_memory_allocated` reports it); on the
        CPU, the bytes the engine placed on the compute device (non-FFN + resident + ring).
    """

    transport: str
    device: str
    lookahead: int
    hits: int
    misses: int
    bytes_moved: int
    stall_s: float
    forward_passes: int
    resident_layers: int
    streamed_layers: int
    resident_bytes: int
    streamed_bytes_per_pass: int
    non_ffn_bytes: int
    ring_bytes: int
    host_store_bytes: int
    peak_device_bytes: int
    layers: tuple[LayerStats, ...] = field(default=())

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (per-layer entries included)."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d

    def summary(self) -> str:
        """One line, as printed by the console command."""
        placement = (
            f"zero-copy={len(self.layers)}"
            if self.transport == "zero-copy"
            else f"resident={self.resident_layers} streamed={self.streamed_layers}"
        )
        return (
            f"transport={self.transport} device={self.device} {placement} "
            f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.1%} "
            f"moved={format_bytes(self.bytes_moved)} stall={self.stall_s * 1000:.1f}ms "
            f"resident_bytes={format_bytes(self.resident_bytes)} "
            f"peak_device={format_bytes(self.peak_device_bytes)}"
        )

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class StatsEvent:
    """What `torus_stats_event` observers receive: a named moment and the snapshot at that moment.

    kind: "attached", "generation_finished", "detached" or "reset".
    """

    kind: str
    model_name: str
    stats: EngineStats
    extra: dict[str, Any] = field(default_factory=dict)
