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
    placement: str  # "resident", "streamed", "zero-copy", "host" (whole layer) or "split"
    hits: int
    misses: int
    bytes_moved: int
    stall_s: float
    host_calls: int = 0  # passes this layer (or its host share) computed on the host
    host_s: float = 0.0  # seconds of host compute (on the host worker for a split layer)
    host_share: float = 0.0  # fraction of the layer's neurons computed on the host in a host pass


@dataclass
class ExpertCounters:
    """Mutable per-MoE-layer counters, updated on the hot path."""

    calls: int = 0
    routed: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    bytes_moved: int = 0
    wasted_bytes: int = 0
    stall_s: float = 0.0
    host_computed: int = 0
    host_s: float = 0.0
    predicted: int = 0
    predicted_routed: int = 0
    predicted_correct: int = 0


@dataclass(frozen=True)
class ExpertLayerStats:
    """One MoE layer's counters at snapshot time.

    routed: (call, expert) pairs this layer needed; hits: of those, already in the device cache
    (or on their way) when the layer started; misses: loaded on demand.
    loads: experts copied for this layer (on demand + prefetched); bytes_moved = loads × expert bytes.
    wasted_bytes: prefetched for this layer and evicted before any use.
    predicted: experts the predictor named for this layer; predicted_routed / predicted_correct:
        routed experts in calls that had a prediction, and how many of them it named (recall).
    """

    layer: int
    calls: int
    routed: int
    hits: int
    misses: int
    loads: int
    bytes_moved: int
    wasted_bytes: int
    stall_s: float
    predicted: int
    predicted_routed: int
    predicted_correct: int
    host_computed: int = 0  # routed experts computed on the host instead of copied (misses in a host pass)
    host_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.routed if self.routed else 1.0

    @property
    def recall(self) -> float | None:
        return self.predicted_correct / self.predicted_routed if self.predicted_routed else None


@dataclass(frozen=True)
class ExpertStats:
    """MoE expert streaming: the cache, the predictor and per-layer counters."""

    predictor: str
    eviction: str
    scope: str
    cache_experts: int
    total_experts: int
    expert_bytes: int
    cache_bytes: int
    prefetch_k: int
    forward_passes: int
    layers: tuple[ExpertLayerStats, ...] = field(default=())

    def _sum(self, name: str) -> Any:
        return sum(getattr(layer, name) for layer in self.layers)

    @property
    def routed(self) -> int:
        return self._sum("routed")

    @property
    def hits(self) -> int:
        return self._sum("hits")

    @property
    def misses(self) -> int:
        return self._sum("misses")

    @property
    def loads(self) -> int:
        return self._sum("loads")

    @property
    def bytes_moved(self) -> int:
        return self._sum("bytes_moved")

    @property
    def wasted_bytes(self) -> int:
        return self._sum("wasted_bytes")

    @property
    def stall_s(self) -> float:
        return self._sum("stall_s")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.routed if self.routed else 1.0

    @property
    def recall(self) -> float | None:
        den = self._sum("predicted_routed")
        return self._sum("predicted_correct") / den if den else None

    def totals(self) -> dict[str, Any]:
        moved = self.bytes_moved
        return {
            "routed": self.routed,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "recall": self.recall,
            "loads": self.loads,
            "bytes_moved": moved,
            "wasted_bytes": self.wasted_bytes,
            "wasted_share": self.wasted_bytes / moved if moved else 0.0,
            "stall_s": self.stall_s,
            "host_computed": self._sum("host_computed"),
            "host_s": self._sum("host_s"),
        }

    def summary(self) -> str:
        recall = self.recall
        return (
            f"experts: cache={self.cache_experts}/{self.total_experts} ({self.scope}, {self.eviction}) "
            f"predictor={self.predictor} hit_rate={self.hit_rate:.1%} "
            f"recall={'-' if recall is None else f'{recall:.1%}'} moved={format_bytes(self.bytes_moved)} "
            f"wasted={format_bytes(self.wasted_bytes)}"
        ) + (f" host_computed={self._sum('host_computed')}" if self._sum("host_computed") else "")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters.

    hits: streamed layers whose weights were already in a slot (or on their way) when needed;
        for MoE models, plus routed experts already in the expert cache (see `experts`).
    misses: streamed layers (or routed experts) loaded synchronously, with no prefetch issued.
    bytes_moved: host→device bytes copied for FFN weights and experts since attach (or the last reset).
    stall_s: time compute waited for FFN weights or experts.
    forward_passes: passes through the streamed layers (0 when nothing streams).
    resident_bytes: device bytes held permanently for FFN layers.
    ring_bytes: device bytes of the slot ring (all slots).
    experts: MoE models only: the expert cache, predictor and per-MoE-layer counters.
    host_compute: the host placement's mode; host_layers: FFN layers computed wholly or in part
        on the host in passes of at most `host_max_tokens` tokens; host_calls / host_s: layer (or
        layer share) computations done on the host, and their seconds.
    ineffective: settings of the config that take no effect on this model and machine, each with
        why (also logged once at attach as a warning), e.g. a weight_quant on layers that all stay
        resident, or a host placement the cost model turned off.
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
    experts: ExpertStats | None = None
    host_compute: str = "off"
    host_layers: int = 0
    host_calls: int = 0
    host_s: float = 0.0
    host_max_tokens: int = 0
    ineffective: tuple[str, ...] = ()

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (per-layer entries included)."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        if self.experts is not None:
            d["experts"].update(self.experts.totals())
        return d

    def summary(self) -> str:
        """One line, as printed by the console command."""
        placement = (
            f"zero-copy={len(self.layers)}"
            if self.transport == "zero-copy"
            else f"resident={self.resident_layers} streamed={self.streamed_layers}"
        )
        return (
            (
                f"transport={self.transport} device={self.device} {placement} "
                f"hits={self.hits} misses={self.misses} hit_rate={self.hit_rate:.1%} "
                f"moved={format_bytes(self.bytes_moved)} stall={self.stall_s * 1000:.1f}ms "
                f"resident_bytes={format_bytes(self.resident_bytes)} "
                f"peak_device={format_bytes(self.peak_device_bytes)}"
            )
            + (
                f" host={self.host_layers} host_calls={self.host_calls} host_time={self.host_s * 1000:.1f}ms"
                if self.host_compute != "off"
                else ""
            )
            + (f" | {self.experts.summary()}" if self.experts is not None else "")
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
