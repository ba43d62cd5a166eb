"""Everything a plugin author implements or receives, in one import.

    from torus_plugins.plugin_api import Architecture, FFNSite, hookimpl

The hooks themselves, with their call semantics, are documented in `torus_plugins.hookspecs`.
What each hook's `register(...)` callback takes:

- `torus_register_architectures`: an `Architecture` (dense FFN layers: `FFNSite` per layer) or a
  `MoEArchitecture` (routed experts: `ExpertSite` per MoE layer, an experts implementation that
  calls the runner stored under `EXPERTS_RUNNER_ATTR`).
- `torus_register_transports`: a `TransportFactory(TransportOptions) -> Transport`; fences are
  opaque (`Fence`), device-side waits may return a `PendingStall`.
- `torus_register_prefetch_policies`: a `PrefetchFactory(PrefetchContext) -> PrefetchPolicy`.
- `torus_register_expert_predictors`: an `ExpertPredictorFactory(ExpertPredictContext) ->
  ExpertPredictor | None` (`top_experts` ranks a score vector).
- `torus_stats_event`: receives a `StatsEvent` whose `stats` is an `EngineStats`.
"""

from __future__ import annotations

from .architecture import EXPERTS_RUNNER_ATTR, Architecture, ExpertSite, ExpertsRunner, FFNSite, MoEArchitecture
from .hookspecs import hookimpl
from .moe.predict import ExpertPredictContext, ExpertPredictor, ExpertPredictorFactory, top_experts
from .prefetch import PrefetchContext, PrefetchFactory, PrefetchPolicy
from .stats import EngineStats, ExpertLayerStats, ExpertStats, LayerStats, StatsEvent
from .transfer import Fence, PendingStall, Transport, TransportFactory, TransportOptions

__all__ = [
    "EXPERTS_RUNNER_ATTR",
    "Architecture",
    "EngineStats",
    "ExpertLayerStats",
    "ExpertPredictContext",
    "ExpertPredictor",
    "ExpertPredictorFactory",
    "ExpertSite",
    "ExpertStats",
    "ExpertsRunner",
    "FFNSite",
    "Fence",
    "LayerStats",
    "MoEArchitecture",
    "PendingStall",
    "PrefetchContext",
    "PrefetchFactory",
    "PrefetchPolicy",
    "StatsEvent",
    "Transport",
    "TransportFactory",
    "TransportOptions",
    "hookimpl",
    "top_experts",
]
