"""The architecture seam: where a model keeps the FFN weights that stream.

The core knows nothing about any framework. An architecture plugin looks at a `torch.nn.Module`
and answers with one `FFNSite` per decoder layer; the transformers adapter registers a table of
them, and a new architecture is one more `Architecture` registered through
`torus_register_architectures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class FFNSite:
    """One decoder layer's streamable FFN weights.

    entry: the first module whose forward reads the weights (its forward pre-hook binds them).
    exit: the last such module (its forward hook releases them). For a `mlp` submodule both are
        the `mlp`; for OPT, whose linears sit directly on the layer, they are `fc1` and `fc2`.
    params: (qualified name, owning module, attribute) for each streamed parameter.
    """

    entry: nn.Module
    exit: nn.Module
    params: tuple[tuple[str, nn.Module, str], ...]


@runtime_checkable
class Architecture(Protocol):
    """Finds FFN sites in models of one family.

    name: shown in error messages and stats (e.g. "llama").
    matches(model): whether this plugin knows the model.
    ffn_sites(model): one `FFNSite` per decoder layer, in execution order.
    kv_bytes_per_token(model): KV-cache bytes per token (all layers), for the budget's reserve;
        return 0 when unknown.
    prepare_model(model) (optional): adjust the model's framework for streaming once it is
        attached (the transformers rows switch off `generate()`'s auto-compile, which would
        bypass the hooks) and return a callable that undoes it, or None.
    """

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]: ...

    def kv_bytes_per_token(self, model: nn.Module) -> int: ...


@dataclass(frozen=True)
class ExpertSite:
    """One MoE layer's routed experts, stored fused: every parameter is `[num_experts, ...]`.

    layer: the decoder layer index (stats and messages speak in decoder layers).
    module: the experts module; the architecture's experts implementation hands its calls to
        the engine (see `MoEArchitecture.install_experts`).
    params: (qualified name, attribute on `module`) of each fused parameter; expert `e`'s
        weights are `getattr(module, attr)[e]`, and one expert's slices travel together.
    router: the layer's router module, which speculative prediction applies to earlier hidden
        states (see `MoEArchitecture.router_scores`).
    input_scale: the per-channel weight of the RMS norm that produces this layer's MoE input,
        when it has one. Speculative routing divides an earlier layer's input by that layer's
        scale and multiplies by this one: the normalised residual stream, as this layer's norm
        would weight it.
    grouped: the experts' own batched implementation, when the model runs one (transformers'
        "grouped_mm" / "batched_mm"): `grouped(module, hidden, top_k_index, top_k_weights)` over
        fused `[experts, ...]` parameters, every routed (token, expert) pair in a few ops and no
        host sync. The engine calls it with a stand-in whose fused parameters are the device
        cache's slots stacked (`num_experts` = slots) and `top_k_index` mapped to slots, so its
        arithmetic is the unwrapped model's. None: the eager per-expert loop (`ExpertsRunner`).
    grouped_skips_padding: `grouped` leaves a pair whose index is `num_experts` or more out of the
        output exactly (no arithmetic on it reaches the sum) when the stand-in's
        `_is_expert_parallel` is set: transformers' grouped_mm. The host placement then computes
        the device's share of a layer whose other experts run on the host in the same one call.
    """

    layer: int
    module: nn.Module
    params: tuple[tuple[str, str], ...]
    num_experts: int
    top_k: int
    router: nn.Module
    input_scale: torch.Tensor | None = None
    grouped: Callable[..., torch.Tensor] | None = None
    grouped_skips_padding: bool = False


#: What an architecture's experts implementation calls: runner(module, hidden, top_k_index,
#: top_k_weights, eager) -> output. `eager` is the module's own per-expert loop, called with a
#: stand-in `self` whose fused parameters yield streamed experts when indexed.
ExpertsRunner = Callable[..., Any]

#: `module.__dict__[EXPERTS_RUNNER_ATTR]` holds the runner while an engine is attached.
EXPERTS_RUNNER_ATTR = "_torus_experts_runner"


@runtime_checkable
class MoEArchitecture(Architecture, Protocol):
    """An architecture whose routed experts stream one expert at a time.

    Everything outside the routed experts (attention, routers, shared experts, dense layers)
    stays on the device; `ffn_sites` may return an empty list.

    expert_sites(model): one `ExpertSite` per MoE layer, in execution order.
    router_scores(site, hidden): `[tokens, num_experts]` scores, higher = more likely routed
        (used to rank experts beyond the router's own top-k).
    install_experts(model): route every experts module's forward through the runner stored
        under `EXPERTS_RUNNER_ATTR`; return a callable that undoes it.
    """

    def expert_sites(self, model: nn.Module) -> list[ExpertSite]: ...

    def router_scores(self, site: ExpertSite, hidden: torch.Tensor) -> torch.Tensor: ...

    def install_experts(self, model: nn.Module) -> Callable[[], None]: ...
