"""Sizes of a model's pieces, read from shapes alone: works on a loaded model and on one built on
the `meta` device (no weights), so the engine and `torus-sparse plan` share one computation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..architecture import Architecture, FFNSite
from ..config import DEFAULT_QUANT_GROUP_SIZE
from ..errors import ConfigError
from ..host_store import PackedLayer, plan_packed


@dataclass(frozen=True)
class ModelSizes:
    """What the residency plan needs to know about one model.

    layer_bytes: device bytes of each FFN layer in its compute dtype (a resident layer's cost).
    transfer_bytes: bytes one transfer of each layer moves (smaller when quantized).
    slot_bytes: what a ring slot needs to hold each layer (landing + dequantized when quantized).
    non_ffn_bytes: everything that always stays on the device (tied weights counted once).
    kv_bytes_per_token: KV cache per token, all layers.
    shared: positions (in the architecture's site list) of FFN layers left out of streaming
        because a parameter of theirs also appears elsewhere in the model (a module shared by
        several layers, or a weight tied to another): they stay on the device with the non-FFN
        weights, since rebinding a shared parameter for one layer would rebind it for all.
    """

    sites: list[FFNSite]
    params: list[list[nn.Parameter]]
    packed: list[PackedLayer]
    layer_bytes: list[int]
    transfer_bytes: list[int]
    slot_bytes: list[int]
    non_ffn_bytes: int
    kv_bytes_per_token: int
    shared: tuple[int, ...] = ()

    @property
    def positions(self) -> list[int]:
        """Each streamable site's position among all the architecture's sites (the decoder
        layer, when nothing is shared): what stats report as a layer's number."""
        return [i for i in range(len(self.sites) + len(self.shared)) if i not in self.shared]

    @property
    def ffn_bytes(self) -> int:
        return sum(self.layer_bytes)


def measure(
    model: nn.Module,
    arch: Architecture,
    quant: str | None = None,
    group_size: int = DEFAULT_QUANT_GROUP_SIZE,
    experts: frozenset[int] | set[int] = frozenset(),
) -> ModelSizes:
    """experts: ids of routed-expert parameters (MoE), which stream separately: neither FFN
    layers nor part of the non-FFN bytes."""
    found = arch.ffn_sites(model)
    if not found and not experts:
        raise ConfigError(f"architecture {arch.name!r} found no FFN layers in {type(model).__name__}")
    # How many places hold each parameter: more than one means a shared module or a tied weight.
    places: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        places[id(p)] = places.get(id(p), 0) + 1
    shared = tuple(
        i
        for i, site in enumerate(found)
        if any(places.get(id(getattr(owner, attr)), 0) > 1 for _, owner, attr in site.params)
        or len({id(getattr(owner, attr)) for _, owner, attr in site.params}) < len(site.params)
    )
    sites = [site for i, site in enumerate(found) if i not in shared]
    if not sites and not experts:
        raise ConfigError(
            f"every FFN layer of {type(model).__name__} shares its weights with another module; "
            f"there is nothing torus-sparse can stream without changing the other users of those weights"
        )
    params: list[list[nn.Parameter]] = []
    packed: list[PackedLayer] = []
    for site in sites:
        ps = [getattr(owner, attr) for _, owner, attr in site.params]
        params.append(ps)
        packed.append(plan_packed([(name, p) for (name, _, _), p in zip(site.params, ps)], quant, group_size))
    ffn_ids = {id(p) for ps in params for p in ps} | set(experts)
    seen: set[object] = set()
    non_ffn = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # Tied weights share a Parameter (same id) or, once loaded, the same memory.
        key = id(t) if t.is_meta else t.data_ptr()
        if id(t) in ffn_ids or key in seen:
            continue
        seen.add(key)
        non_ffn += t.numel() * t.element_size()
    return ModelSizes(
        sites=sites,
        params=params,
        packed=packed,
        layer_bytes=[pk.compute.nbytes for pk in packed],
        transfer_bytes=[pk.transfer.nbytes for pk in packed],
        slot_bytes=[pk.transfer.nbytes + (pk.compute.nbytes if pk.quantized else 0) for pk in packed],
        non_ffn_bytes=non_ffn,
        kv_bytes_per_token=int(arch.kv_bytes_per_token(model)),
        shared=shared,
    )
