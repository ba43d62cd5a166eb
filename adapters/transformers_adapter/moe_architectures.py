"""Built-in MoE architecture plugin: routed experts of `transformers` 5 MoE models stream per expert.

transformers 5 stores each MoE layer's experts fused (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`; GPT-OSS transposed, interleaved and with biases) and lets a model
pick its experts implementation by name (`ExpertsInterface`). This plugin registers one more,
"torus_streamed", which hands each call to the attached engine: it computes only the routed
experts, pulled through the device expert cache, using the model's own eager per-expert loop,
so results match `experts_implementation="eager"` bit for bit; a model that runs a batched
implementation ("grouped_mm", transformers' default, or "batched_mm") keeps it: the engine calls
that function over its device cache's slots (`ExpertSite.grouped`), with the same arithmetic.

Routers, shared experts and dense layers (DeepSeek-V3's first layers) stay on the device.
A new MoE family is one more `MoEDecoder` row registered from a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from torus_plugins.architecture import EXPERTS_RUNNER_ATTR, ExpertSite, FFNSite
from torus_plugins.hookspecs import hookimpl

from .architectures import DecoderFFN

#: The name under which the streamed experts function is registered in transformers.
EXPERTS_IMPLEMENTATION = "torus_streamed"


def eager_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The experts class's own eager loop, under transformers' implementation switch."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


def streamed_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The "torus_streamed" experts implementation: the engine's runner, or eager when detached."""
    eager = eager_forward(self)
    runner = self.__dict__.get(EXPERTS_RUNNER_ATTR)
    if runner is None:
        return eager(self, hidden_states, top_k_index, top_k_weights)
    return runner(self, hidden_states, top_k_index, top_k_weights, eager)


#: transformers' experts implementations that compute every routed pair at once from fused weights
BATCHED_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


def batched_experts_function(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The model's experts implementation when it is a batched one (see `ExpertSite.grouped`)."""
    name = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if name not in BATCHED_IMPLEMENTATIONS:
        return None
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS.get(name)


def register_experts_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, streamed_experts_forward)


@dataclass(frozen=True)
class MoEDecoder(DecoderFFN):
    """A `transformers` MoE family: `layers[i].<moe>.<experts>` fused experts, `<router>` router.

    moe: the layer's MoE block attribute; experts / router: attributes of that block.
    norm: the layer's RMS norm in front of the MoE block (its weight rescales hidden states for
        speculative routing; `None` when the family has none of that form).
    Layers whose block has no experts (dense layers) are left on the device.
    """

    moe: str = "mlp"
    experts: str = "experts"
    router: str = "gate"
    norm: str | None = "post_attention_layernorm"

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        return []  # routed experts stream through `expert_sites`; nothing streams per layer

    def expert_sites(self, model: nn.Module) -> list[ExpertSite]:
        sites = []
        grouped = batched_experts_function(model)
        # grouped_mm masks EP sentinel rows (index >= num_experts) out of its output; batched_mm
        # only zeroes their weights (0 x its output: not provably nothing)
        skips = getattr(getattr(model, "config", None), "_experts_implementation", None) == "grouped_mm"
        for i, layer in enumerate(self._layers(model)):
            block = getattr(layer, self.moe, None)
            experts = getattr(block, self.experts, None)
            router = getattr(block, self.router, None)
            if experts is None or router is None:
                continue
            params = tuple(
                (f"layers.{i}.{self.moe}.{self.experts}.{attr}", attr)
                for attr, _ in experts.named_parameters(recurse=False)
            )
            n = int(experts.num_experts)
            top_k = int(getattr(router, "top_k", 0) or model.config.num_experts_per_tok)
            norm = getattr(getattr(layer, self.norm, None), "weight", None) if self.norm else None
            scale = norm if isinstance(norm, torch.Tensor) and norm.dim() == 1 else None
            sites.append(
                ExpertSite(
                    layer=i,
                    module=experts,
                    params=params,
                    num_experts=n,
                    top_k=top_k,
                    router=router,
                    input_scale=scale,
                    grouped=grouped,
                    grouped_skips_padding=grouped is not None and skips,
                )
            )
        return sites

    def router_scores(self, site: ExpertSite, hidden: torch.Tensor) -> torch.Tensor:
        return router_scores(site, hidden)

    def install_experts(self, model: nn.Module) -> Callable[[], None]:
        return install_streamed_experts(model)


def router_scores(site: ExpertSite, hidden: torch.Tensor) -> torch.Tensor:
    """`[tokens, num_experts]` scores of the site's router on `hidden` (higher: more likely routed).

    A router that is one linear map (every family here) is applied as that map alone: its logits
    rank experts as its softmax does, in a few ops instead of its whole top-k routing."""
    weight = getattr(site.router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape == (site.num_experts, hidden.shape[-1]):
        bias = getattr(site.router, "bias", None)
        logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, bias)
    else:
        out = site.router(hidden)
        logits = out[0] if isinstance(out, tuple) else out
    bias = getattr(site.router, "e_score_correction_bias", None)
    if bias is not None:  # DeepSeek-V3 ranks sigmoid scores plus a learned correction
        return logits.sigmoid() + bias
    return logits


def install_streamed_experts(model: nn.Module) -> Callable[[], None]:
    """Select the "torus_streamed" experts implementation on `model`; returns the undo."""
    register_experts_implementation()
    previous = getattr(model.config, "_experts_implementation", None)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)

    def restore() -> None:
        model.set_experts_implementation(previous or "eager")

    return restore


MOE_ARCHITECTURES: tuple[MoEDecoder, ...] = (
    MoEDecoder("mixtral", ("mixtral",)),
    MoEDecoder("olmoe", ("olmoe",)),
    MoEDecoder("qwen2_moe", ("qwen2_moe",)),
    MoEDecoder("qwen3_moe", ("qwen3_moe",)),
    MoEDecoder("deepseek_v3", ("deepseek_v3",)),
    MoEDecoder("gpt_oss", ("gpt_oss",), router="router"),
)


def moe_info(model: nn.Module) -> dict[str, Any]:
    """Experts per layer, top-k and bytes per expert of an MoE model (for reports)."""
    arch = next((a for a in MOE_ARCHITECTURES if a.matches(model)), None)
    if arch is None:
        return {}
    sites = arch.expert_sites(model)
    s = sites[0]
    per_expert = sum(
        getattr(s.module, attr)[0].numel() * getattr(s.module, attr).element_size() for _, attr in s.params
    )
    return {"moe_layers": len(sites), "experts": s.num_experts, "top_k": s.top_k, "expert_bytes": per_expert}


@hookimpl
def torus_register_architectures(register) -> None:
    for arch in MOE_ARCHITECTURES:
        register(arch)
