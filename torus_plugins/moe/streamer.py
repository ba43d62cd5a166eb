"""Routed-expert streaming for MoE layers: a host store per expert, a device cache, prediction.

Hot path, once per MoE layer and forward pass (`ExpertStreamer.run`):
1. the routed experts of this call are known (the router ran); those already in the device
   cache are hits, the others start loading now and count as misses;
2. the predictor names experts for the next layers and their copies are queued behind;
3. when the model runs a batched experts implementation (`ExpertSite.grouped`, transformers'
   grouped_mm by default) and every routed expert sits in the cache, that function runs once over
   the cache's slots stacked as fused parameters (`grouped.SlotStack`), `top_k_index` mapped to
   slots by one gather: outputs equal the unwrapped model's bit for bit;
4. otherwise (the eager loop, more routed experts than slots, an aliasing transport) the model's
   own per-expert loop runs with a stand-in `self` whose fused parameters, when indexed by an
   expert, wait for that expert's slot and return its tensors: the eager model's arithmetic.

Host syncs per layer and decode token: one, the read of the routed ids (with the predicted ids of
the built-in predictors in the same transfer); the eager loop adds its own per expert. With the
host placement, missed experts compute on the host with no sync of their own (`_run_split`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..architecture import EXPERTS_RUNNER_ATTR, ExpertSite, MoEArchitecture
from ..config import TorusConfig
from ..errors import ConfigError, TransferError
from ..guards import check_traceable_call
from ..host_compute.kernels import (
    HostComputeError,
    HostLinearMode,
    HostWeight,
    in_place_weight,
    stand_in,
    stored_weight,
)
from ..host_compute.staging import Staging
from ..host_compute.worker import HostWorker
from ..host_store import HostStore, PackedLayer, plan_packed
from ..os_memory import release_pages
from ..progress import Step, step
from ..slots import Slot
from ..stalls import StallLedger
from ..stats import ExpertCounters, ExpertLayerStats, ExpertStats
from ..store_file import store_directory
from ..transfer import Transport
from ..weight_source import ParamReader, unmeta
from .cache import ExpertCache, ExpertCachePlan, plan_expert_cache
from .grouped import SlotStack
from .predict import ExpertPredictContext, ExpertPredictor


def unit_packing(sites: list[ExpertSite], quant: str | None, group_size: int) -> PackedLayer:
    """The byte layout of one expert (all experts of a model share it): read from shapes only."""
    site = sites[0]
    tensors = [(f"{name}[0]", getattr(site.module, attr)[0]) for name, attr in site.params]
    return plan_packed(tensors, quant, group_size)


def expert_param_ids(sites: list[ExpertSite]) -> set[int]:
    return {id(getattr(s.module, attr)) for s in sites for _, attr in s.params}


def plan_experts(
    sites: list[ExpertSite], config: TorusConfig, available_bytes: int | None
) -> tuple[ExpertCachePlan, PackedLayer]:
    """Size the expert cache for `sites` (no model state is touched)."""
    packed = unit_packing(sites, config.weight_quant, config.quant_group_size)
    slot_bytes = packed.transfer.nbytes + (packed.compute.nbytes if packed.quantized else 0)
    plan = plan_expert_cache(
        [s.num_experts for s in sites],
        [s.top_k for s in sites],
        slot_bytes,
        config.moe_cache_scope,
        config.moe_cache_experts,
        available_bytes,
    )
    return plan, packed


def predict_context(
    model: nn.Module, arch: MoEArchitecture, sites: list[ExpertSite], config: TorusConfig
) -> ExpertPredictContext:
    """What a predictor plugin is built from (known before any weight moves)."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    k = config.moe_expert_prefetch_k
    return ExpertPredictContext(
        num_layers=len(sites),
        num_experts=tuple(s.num_experts for s in sites),
        top_k=tuple(s.top_k for s in sites),
        prefetch_k=max(s.top_k for s in sites) if k is None else k,
        lookahead=config.lookahead,
        router_scores=_speculative_scores(arch, sites),
        predictor_path=config.moe_predictor_path,
        model={
            "model_type": getattr(text_cfg, "model_type", None) or arch.name,
            "hidden_size": getattr(text_cfg, "hidden_size", 0),
        },
        options=dict(config.options),
    )


def _speculative_scores(arch: MoEArchitecture, sites: list[ExpertSite]) -> Callable[..., torch.Tensor]:
    """router_scores(j, hidden, source=None): layer j's router on `hidden`; with `source`, the
    hidden states are MoE layer `source`'s input, re-weighted by the two layers' norm scales."""
    ratios: dict[tuple[int, int], torch.Tensor | None] = {}

    def ratio(source: int, j: int) -> torch.Tensor | None:
        if (source, j) not in ratios:
            a, b = sites[source].input_scale, sites[j].input_scale
            r = None
            if a is not None and b is not None and a.shape == b.shape:
                a, b = a.detach(), b.detach()
                r = torch.where(a != 0, b / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))
            ratios[(source, j)] = r
        return ratios[(source, j)]

    def scores(j: int, hidden: torch.Tensor, source: int | None = None) -> torch.Tensor:
        if source is not None:
            r = ratio(source, j)
            if r is not None:
                if r.device != hidden.device or r.dtype != hidden.dtype:  # once: kept converted
                    r = ratios[(source, j)] = r.to(hidden.device, hidden.dtype)
                hidden = hidden * r
        return arch.router_scores(sites[j], hidden)

    return scores


class _ExpertsView:
    """Stands in for a fused `[experts, ...]` parameter: `view[e]` is expert e's streamed tensor."""

    __slots__ = ("_get", "_k", "shape", "dtype", "device")

    def __init__(self, get: Callable[[Any, int], torch.Tensor], k: int, like: torch.Tensor) -> None:
        self._get, self._k = get, k
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device

    def __getitem__(self, expert: Any) -> torch.Tensor:
        return self._get(expert, self._k)


class _ModuleShim:
    """The experts module as its eager forward sees it: every attribute is the module's, except
    the fused parameters, which are `_ExpertsView`s."""

    def __init__(self, module: nn.Module, views: dict[str, _ExpertsView]) -> None:
        self.__dict__["_module"] = module
        self.__dict__.update(views)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


class ExpertStreamer:
    """Owns the per-expert host store, the device expert cache and the MoE counters."""

    def __init__(
        self,
        model: nn.Module,
        arch: MoEArchitecture,
        sites: list[ExpertSite],
        plan: ExpertCachePlan,
        config: TorusConfig,
        transport: Transport,
        device: torch.device,
        predictor: ExpertPredictor | None,
        prefetch_k: int,
        pin_memory: bool,
        read: ParamReader | None = None,
        disk_budget: int | None = None,
    ) -> None:
        """read: reads an experts parameter's slices (an empty one's from the model's weight source);
        disk_budget: keep the expert store in its file within this many resident bytes (`disk_tier`)."""
        self.model, self.arch, self.sites, self.plan = model, arch, sites, plan
        self.read = read if read is not None else ParamReader(model, None)
        self.config, self.transport, self.device = config, transport, device
        self.predictor = predictor
        self.prefetch_k = prefetch_k
        qdev = device if device.type == "cuda" else None  # as the dense engine: quantize on the GPU
        self.store = HostStore(pin_memory, config.weight_quant, config.quant_group_size, qdev)
        if disk_budget is not None:
            self.store.use_disk_tier(disk_budget, lambda i: ())  # read ahead as predictions prefetch
        self.base: list[int] = []
        self._unit_layer: list[int] = []
        self._origins: list[list[tuple[nn.Parameter, torch.device]]] = []
        self._restore: Callable[[], None] | None = None
        self._installed: list[nn.Module] = []
        self._aliases = bool(getattr(transport, "aliases_source", False))
        self._stalls = StallLedger(self._add_stall)
        self.counters = [ExpertCounters() for _ in sites]
        self.forward_passes = 0
        self._active: tuple[Slot, int, list[torch.Tensor]] | None = None
        self._pending: set[int] = set()
        self._predicted: dict[int, set[int]] = {}
        self.cache: ExpertCache | None = None
        #: host placement: passes of at most this many tokens compute cache misses on the host
        self._host_max = 0
        self._host_worker: HostWorker | None = None
        self._staging: Staging | None = None
        self._host_shims: list[_ModuleShim] = []
        self._host_mode: HostLinearMode | None = None
        self._host_tensors: list[list[torch.Tensor]] = []
        self._force_host: frozenset[int] = frozenset()  # `verify_host`: these units on the host
        #: the grouped path: all slots in one allocation, their stacks and the unit -> slot table
        self._stack: SlotStack | None = None
        self._grouped_shims: list[_ModuleShim | None] = []
        self._split_shims: list[_ModuleShim] = []
        self._tables: list[torch.Tensor] = []

    # ------------------------------------------------------------------ set-up
    def build(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Pack every expert into its own host buffer, allocate the cache, route the experts
        modules' forwards here. The caller tears down on failure."""
        if (self.store.quant is not None or self.store.tier is not None) and self.config.store_cache is not None:
            # One pass over every expert for the file's key, before the loop below frees each
            # layer's fused originals (a list of the units would keep them all alive).
            with step("looking for a stored copy of the quantized experts"):
                self.store.use_file(
                    store_directory(self.config.store_cache),
                    "expert",
                    (
                        [(f"{name}[{e}]", self.read(getattr(site.module, attr), e)) for name, attr in site.params]
                        for site in self.sites
                        for e in range(site.num_experts)
                    ),
                )
        with step(self.store.packing_phase("experts"), len(self.sites), progress) as packing:
            self._pack_experts(packing)
        if self.store.writing_file:
            with step(f"writing the {self.store.quant} expert store"):
                self.store.finish()
        else:
            self.store.finish()
        buffers = self._slot_buffers()
        self.cache = ExpertCache(self.plan, buffers, self.store.layers, self.config.moe_eviction, self._unit_layer)
        self._shims = [self._make_shim(j) for j in range(len(self.sites))]
        self._make_grouped()
        for j, site in enumerate(self.sites):
            site.module.__dict__[EXPERTS_RUNNER_ATTR] = self._make_runner(j)
            self._installed.append(site.module)
        self._restore = self.arch.install_experts(self.model)

    def _pack_experts(self, packing: Step) -> None:
        """Pack every expert into its own host buffer (counted per MoE layer); each layer's
        fused originals then go, the module keeping a memory-free placeholder."""
        dev = self.device
        for j, site in enumerate(self.sites):
            self.base.append(len(self._unit_layer))
            params = [getattr(site.module, attr) for _, attr in site.params]
            for e in range(site.num_experts):
                unit = [(f"{name}[{e}]", self.read(p, e)) for (name, _), p in zip(site.params, params)]
                self.store.add_layer(unit)
                if any(p.is_meta for p in params):  # read from the weight source: its pages go now
                    for _, t in unit:
                        release_pages(t)
                del unit
                self._unit_layer.append(j)
            # An empty (meta) parameter comes back on the CPU at detach, from the store.
            self._origins.append([(p, p.device if not p.is_meta else torch.device("cpu")) for p in params])
            for p in params:
                if not p.is_meta:
                    release_pages(p.data)  # a mapped checkpoint's pages of them too (os_memory)
                unmeta(p, dev)
                p.data = torch.zeros((), dtype=p.dtype, device=dev).expand(p.shape)
            packing.advance(j + 1)

    def _slot_buffers(self) -> list[torch.Tensor]:
        """The cache's slot buffers: one allocation for all (`SlotStack`) when the grouped path
        can run, else one each."""
        grouped = all(s.grouped is not None for s in self.sites) and not self._aliases
        if not grouped:
            return [self.transport.alloc(self.plan.slot_bytes) for _ in range(self.plan.slots)]
        self._stack = SlotStack(
            self.transport, self.plan.slots, self.plan.slot_bytes, len(self._unit_layer), self.device
        )
        return self._stack.buffers

    def _make_grouped(self) -> None:
        stack = self._stack
        if stack is None:
            return
        for j, site in enumerate(self.sites):
            stacked = stack.stacked(self.store.layers[self.base[j]])
            views = {attr: t for (_, attr), t in zip(site.params, stacked)}
            shim = _ModuleShim(site.module, views)
            shim.__dict__.update(num_experts=stack.slots, _is_expert_parallel=False)
            self._grouped_shims.append(shim)
            split = _ModuleShim(site.module, views)  # padding indices (host experts) left out
            split.__dict__.update(num_experts=stack.slots, _is_expert_parallel=True)
            self._split_shims.append(split)
            self._tables.append(stack.table[self.base[j] : self.base[j] + site.num_experts])

    def _make_shim(self, j: int) -> _ModuleShim:
        site = self.sites[j]

        n = site.num_experts

        def get(expert: Any, k: int) -> torch.Tensor:
            e = int(expert)
            if not 0 <= e < n:  # another layer's unit lies past this one's: never hand it out
                raise HostComputeError(f"MoE layer {site.layer}'s experts were indexed with expert {e} of {n}")
            return self._expert_tensor(j, e, k)

        views = {attr: _ExpertsView(get, k, getattr(site.module, attr)) for k, (_, attr) in enumerate(site.params)}
        return _ModuleShim(site.module, views)

    def _make_runner(self, j: int) -> Callable[..., torch.Tensor]:
        def runner(module: nn.Module, hidden, top_k_index, top_k_weights, eager) -> torch.Tensor:
            return self.run(j, hidden, top_k_index, top_k_weights, eager)

        return runner

    # ------------------------------------------------------------------ hot path
    def run(self, j: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights, eager) -> torch.Tensor:
        """One MoE layer's routed experts: load what is missing, prefetch ahead, compute."""
        check_traceable_call(self.device)
        self._release_active()
        cache = self.cache
        assert cache is not None
        site = self.sites[j]
        base = self.base[j]
        host = (
            self._host_max > 0 and not torch.is_grad_enabled() and hidden.numel() <= self._host_max * hidden.shape[-1]
        )
        # A pass that may compute missed experts on the host: their inputs start crossing now, and
        # the ids read below (this layer's one host sync) completes those copies too.
        staged = self._staging.stage(hidden, top_k_weights) if (host or self._force_host) and self._staging else None
        predictions = self.predictor.predict(j, hidden, top_k_index) if self.predictor is not None else ()
        routed, predictions = _read_ids(top_k_index, predictions)  # this layer's one host sync
        needed = sorted({e for e in routed if 0 <= e < site.num_experts})
        units = [base + e for e in needed]
        c = self.counters[j]
        c.calls += 1
        c.routed += len(units)
        guessed = self._predicted.pop(j, None)
        if guessed is not None:
            c.predicted_routed += len(needed)
            c.predicted_correct += len(guessed.intersection(needed))
        cache.enter(j)
        ring = cache.ring(j)
        protect = set(units)
        self._pending = set(units)
        on_host: list[int] = []
        for u in units:
            cache.routed(u, j)
            if u in self._force_host or (host and ring.find(u) is None):
                c.misses += 1
                on_host.append(u)  # computed where it lies instead of copied
            elif ring.find(u) is None:
                c.misses += 1
                self._load(ring, u, protect, prefetched=False)  # a full cache defers it to compute
            else:
                c.hits += 1
        if predictions:
            for nxt, experts in predictions:
                nbase, n_e = self.base[nxt], self.sites[nxt].num_experts
                experts = [e for e in experts if 0 <= e < n_e]
                self._predicted[nxt] = set(experts)
                self.counters[nxt].predicted += len(experts)
                wanted = [nbase + e for e in experts]
                protect.update(wanted)
                nring = cache.ring(nxt)
                for u in wanted:
                    if nring.find(u) is None and not self._load(nring, u, protect, prefetched=True):
                        break
        try:
            if on_host:
                split = (routed, staged, units)
                return self._run_split(j, c, on_host, hidden, top_k_index, top_k_weights, eager, split)
            if self._stack is not None and all(ring.find(u) is not None for u in units):
                return self._run_grouped(j, ring, units, hidden, top_k_index, top_k_weights)
            return eager(self._shims[j], hidden, top_k_index, top_k_weights)
        finally:
            self._release_active()
            self._pending = set()
            if j == len(self.sites) - 1:
                self.forward_passes += 1

    def _run_grouped(
        self, j: int, ring, units: list[int], hidden, top_k_index, top_k_weights, skip=None
    ) -> torch.Tensor:
        """Every routed expert is in the cache: wait for their copies (on the device), then run the
        model's batched function once over the stacked slots, `top_k_index` gathered to slots.
        `skip`: a device bool per expert (and one past the last): those pairs go to the padding
        slot index, which the function leaves out (`ExpertSite.grouped_skips_padding`)."""
        site = self.sites[j]
        used = []
        for u in units:
            slot = ring.find(u)
            self._pending.discard(u)
            what = f"expert {u - self.base[j]} of MoE layer {site.layer}"
            if self.store.layers[u].quantized:
                _, waited = ring.land(slot, u, self.transport, None, what)  # dequantized once per landing
            else:
                waited = _wait_landed(ring, slot, self.transport, what)
            self._stalls.record(j, waited)
            ring.touch(slot)
            used.append(slot)
        index = self._tables[j][top_k_index]
        shim = self._grouped_shims[j]
        if skip is not None:
            index = index.masked_fill(skip[top_k_index], self._stack.slots)  # type: ignore[union-attr]
            shim = self._split_shims[j]
        out = site.grouped(shim, hidden, index, top_k_weights)
        fence = self.transport.compute_fence()
        for slot in used:
            slot.free = fence
        return out

    def _run_split(
        self, j: int, c: ExpertCounters, on_host: list[int], hidden, top_k_index, top_k_weights, eager, split
    ):
        """Cached experts on the device, `on_host` ones on the host worker at the same time; summed.
        Each side sees the routing with the other side's experts replaced by the index one past the
        last expert, which both the eager loop and `grouped` (`grouped_skips_padding`) leave out.

        No host sync of its own: the host side's inputs were staged before the layer's ids read
        (`Staging.stage`) and its routing is built on the host from those ids; the device side's
        mask of host experts and the host's output go over by non_blocking copies from
        page-locked memory (`Staging.to_device`)."""
        routed, staged, units = split
        site, n, base = self.sites[j], self.sites[j].num_experts, self.base[j]
        self._pending.difference_update(on_host)
        staging = self._staging
        assert self._host_worker is not None and staging is not None and staged is not None
        hidden_h, weights_h = staged
        mask_h = torch.zeros(n + 1, dtype=torch.bool)  # per expert (and the padding index): on the host
        mask_h[[u - base for u in on_host]] = True
        index_h = torch.tensor(routed, dtype=top_k_index.dtype).view(top_k_index.shape)
        valid = (index_h >= 0) & (index_h < n)
        host_index = index_h.masked_fill(~(valid & mask_h[index_h.clamp(0, n)]), n)
        skip = staging.to_device(mask_h, key="moe_mask")
        pending = self._host_worker.submit(self._host_eager, j, eager, hidden_h, host_index, weights_h)
        try:
            host_units = set(on_host)
            on_device = [u for u in units if u not in host_units]
            ring = self.cache.ring(j)  # type: ignore[union-attr]
            if (
                self._stack is not None
                and site.grouped_skips_padding
                and all(ring.find(u) is not None for u in on_device)
            ):
                out = self._run_grouped(j, ring, on_device, hidden, top_k_index, top_k_weights, skip)
            else:
                device_index = top_k_index.masked_fill(skip[top_k_index.clamp(0, n)], n)
                out = eager(self._shims[j], hidden, device_index, top_k_weights)
        finally:
            out_host, seconds = pending.result()  # always collected: the worker never outlives the pass
        c.host_computed += len(on_host)
        c.host_s += seconds
        return out + staging.to_device(out_host, key="moe_out")

    def _host_eager(self, j: int, eager, hidden, top_k_index, top_k_weights):
        if self._host_mode is None:
            return eager(self._host_shims[j], hidden, top_k_index, top_k_weights)
        with self._host_mode:
            return eager(self._host_shims[j], hidden, top_k_index, top_k_weights)

    # ------------------------------------------------------------------ host placement
    def enable_host(self, max_tokens: int, kernel: str, act: torch.dtype | None) -> None:
        """Compute cache misses of passes with at most `max_tokens` tokens on the host, from the
        host store: weights as stored (bf16 ones through the native bf16 kernel when `kernel` is
        "bf16native"), or quantized ones through the chosen host kernel."""
        self._host_max = max_tokens
        self._host_worker = HostWorker(self.device)
        self._staging = Staging(self.device)  # how host experts' inputs and outputs cross
        weights: dict[int, HostWeight] = {}
        tensors: list[list[torch.Tensor]] = []
        for unit, packed in enumerate(self.store.layers):
            views = packed.transfer.views(self.store.buffers[unit])  # type: ignore[arg-type]
            if not packed.quantized:
                tensors.append([self._in_place(v, kernel, weights) for v in views])
                continue
            unit_tensors = []
            for (mode, ti, si), t in zip(packed.recipe, packed.compute.tensors):
                if mode == "raw":
                    unit_tensors.append(views[ti])
                    continue
                hw = stored_weight(views[ti], views[si], mode, kernel, act, t.dtype)
                marker = stand_in(hw, t.dtype)
                weights[id(marker)] = hw
                unit_tensors.append(marker)
            tensors.append(unit_tensors)
        self._host_mode = HostLinearMode(weights) if weights else None
        self._host_tensors = tensors
        self._host_shims = [self._make_host_shim(j) for j in range(len(self.sites))]

    @staticmethod
    def _in_place(t: torch.Tensor, kernel: str, weights: dict[int, HostWeight]) -> torch.Tensor:
        """An expert weight as stored: a stand-in computed by the native bf16 kernel reading `t` in
        place where `kernel` is that one and takes it (`in_place_weight`), else `t` itself."""
        hw = in_place_weight(t, kernel)
        if hw is None:
            return t
        marker = stand_in(hw, t.dtype)
        weights[id(marker)] = hw
        return marker

    def _make_host_shim(self, j: int) -> _ModuleShim:
        site, base, n = self.sites[j], self.base[j], self.sites[j].num_experts

        def get(expert: Any, k: int) -> torch.Tensor:
            e = int(expert)
            if not 0 <= e < n:
                raise HostComputeError(f"MoE layer {site.layer}'s experts were indexed with expert {e} of {n}")
            return self._host_tensors[base + e][k]

        views = {attr: _ExpertsView(get, k, getattr(site.module, attr)) for k, (_, attr) in enumerate(site.params)}
        return _ModuleShim(site.module, views)

    def disable_host(self) -> None:
        """Every expert streams again (the host path failed its proof)."""
        self._host_max = 0

    def verify_host(self, tolerance: float) -> None:
        """Prove host experts on the first MoE layer: a few tokens routed to its first experts,
        computed on the device alone and split between the host and the device (every other
        expert on the host), must agree within `tolerance`."""
        if not self._host_max:
            return
        site = self.sites[0]
        weight = getattr(site.module, site.params[0][1])
        hidden_size = int(getattr(getattr(self.model, "config", None), "hidden_size", 0) or weight.shape[-1])
        gen = torch.Generator().manual_seed(0)
        tokens, k = 2, min(site.top_k, site.num_experts)
        hidden = torch.randn(tokens, hidden_size, generator=gen).to(self.device, weight.dtype)
        index = torch.stack([torch.arange(k) + t for t in range(tokens)]).remainder(site.num_experts).to(self.device)
        weights = torch.full((tokens, k), 1.0 / k).to(self.device, weight.dtype)
        with torch.no_grad():
            # No pass-size rule while proving: the reference streams every expert, then every other
            # expert is forced onto the host and the rest load to the device, so each side sees the
            # other's pairs as the padding index, as a decode step with some experts cached does.
            saved, self._host_max = self._host_max, 0
            try:
                ref = site.module(hidden, index, weights)
                self._force_host = frozenset(self.base[0] + e for e in range(0, site.num_experts, 2))
                try:
                    got = site.module(hidden, index, weights)
                except HostComputeError:
                    raise
                except Exception as exc:
                    raise HostComputeError(
                        f"MoE layer {site.layer}'s experts ({type(site.module).__name__}) failed on the host: {exc} "
                        f"(host experts need the eager loop to skip the padding index {site.num_experts})"
                    ) from exc
            finally:
                self._host_max = saved
                self._force_host = frozenset()
        scale = ref.abs().max().item() or 1.0
        err = (got.float() - ref.float()).abs().max().item() / scale
        if not err <= tolerance:
            raise HostComputeError(
                f"MoE layer {site.layer}'s experts computed on the host differ from the streamed ones by {err:.2e} "
                f"of the output (bound {tolerance:.0e}); use host_compute='off'"
            )

    def _load(self, ring, unit: int, keep: set[int], prefetched: bool) -> Slot | None:
        active = self._active[0] if self._active is not None else None
        slot = ring.victim(keep, active)
        if slot is None:
            return None
        old = slot.layer
        if old is not None and slot.prefetched and not slot.used_since_load:
            self.counters[self._unit_layer[old]].wasted_bytes += self.store.buffers[old].numel()
        moved = ring.fill(slot, unit, self.store.source(unit), self.transport)
        slot.prefetched = prefetched
        if self._stack is not None:
            self._stack.assign(unit, slot.buffer)
        c = self.counters[self._unit_layer[unit]]
        c.loads += 1
        c.bytes_moved += moved
        return slot

    def _expert_tensor(self, j: int, expert: int, k: int) -> torch.Tensor:
        unit = self.base[j] + expert
        active = self._active
        if active is not None and active[1] == unit:
            return active[2][k]
        self._release_active()
        ring = self.cache.ring(j)  # type: ignore[union-attr]
        self._pending.discard(unit)
        slot = ring.find(unit)
        if slot is None:
            # More experts routed at once than the cache holds (a long prompt): load it now,
            # evicting one already computed rather than one this call still needs.
            slot = self._load(ring, unit, self._pending, prefetched=False) or self._load(ring, unit, set(), False)
            if slot is None:
                raise TransferError(f"no expert cache slot is free for MoE layer {self.sites[j].layer}")
        if slot.layer != unit:  # the ordering rules make this impossible; never compute from it
            raise TransferError(f"expert cache slot {slot.index} holds unit {slot.layer}, expected {unit}")
        source = self.store.buffers[unit] if self._aliases else None
        what = f"expert {expert} of MoE layer {self.sites[j].layer}"
        views, waited = ring.land(slot, unit, self.transport, source, what)
        self._stalls.record(j, waited)
        ring.touch(slot)
        self._active = (slot, unit, views.bind)
        return views.bind[k]

    def _release_active(self) -> None:
        if self._active is not None:
            self._active[0].free = self.transport.compute_fence()
            self._active = None

    # ------------------------------------------------------------------ stats
    def _add_stall(self, j: int, seconds: float) -> None:
        self.counters[j].stall_s += seconds

    def stats(self) -> ExpertStats:
        self._stalls.settle()
        layers = tuple(
            ExpertLayerStats(
                layer=s.layer,
                calls=c.calls,
                routed=c.routed,
                hits=c.hits,
                misses=c.misses,
                loads=c.loads,
                bytes_moved=c.bytes_moved,
                wasted_bytes=c.wasted_bytes,
                stall_s=c.stall_s,
                predicted=c.predicted,
                predicted_routed=c.predicted_routed,
                predicted_correct=c.predicted_correct,
                host_computed=c.host_computed,
                host_s=c.host_s,
            )
            for s, c in zip(self.sites, self.counters)
        )
        return ExpertStats(
            predictor=self.config.moe_predictor,
            eviction=self.config.moe_eviction,
            scope=self.plan.scope,
            cache_experts=self.plan.slots,
            total_experts=self.plan.total_experts,
            expert_bytes=self.store.layers[0].transfer.nbytes if self.store.layers else 0,
            cache_bytes=self.plan.nbytes,
            prefetch_k=self.prefetch_k,
            forward_passes=self.forward_passes,
            layers=layers,
        )

    def reset_stats(self) -> None:
        self._stalls.settle()
        self.counters = [ExpertCounters() for _ in self.sites]
        self.forward_passes = 0

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Undo `build` (whatever part of it ran): forwards restored, fused parameters rebuilt
        from the host store bit for bit (dequantized with `weight_quant`), cache freed."""
        if self._host_worker is not None:
            self._host_worker.close()
            self._host_worker = None
        self._host_shims, self._host_tensors, self._host_mode = [], [], None
        if self._restore is not None:
            try:
                self._restore()
            finally:
                self._restore = None
        for m in self._installed:
            m.__dict__.pop(EXPERTS_RUNNER_ATTR, None)
        self._installed.clear()
        self._active = None
        for j, origins in enumerate(self._origins):
            site = self.sites[j]
            per_expert = [
                self.store.weights(self.base[j] + e, self.store.buffers[self.base[j] + e], "cpu")
                for e in range(site.num_experts)
            ]
            for k, (p, device) in enumerate(origins):
                p.data = torch.stack([w[k] for w in per_expert]).to(device)
            for e in range(site.num_experts):
                self.store.drop(self.base[j] + e)
        self._origins.clear()
        self.store.close()  # units of a site whose packing failed half-way
        if self.cache is not None:
            self.cache.clear()
        self.cache = None


def _read_ids(top_k_index: torch.Tensor, predictions) -> tuple[list[int], list[tuple[int, list[int]]]]:  # noqa: ANN001
    """The routed expert ids on the host, and the predictions with tensor ids read there too: one
    device-to-host transfer for all of them (a predictor may answer with tensors on the device,
    see `ExpertPredictor`), so a layer syncs once however many layers it predicts for."""
    flat = top_k_index.reshape(-1)
    tensors = [(i, e) for i, (_, e) in enumerate(predictions) if isinstance(e, torch.Tensor)]
    if not tensors:
        return flat.tolist(), [(nxt, list(e)) for nxt, e in predictions]
    parts = [flat] + [e.reshape(-1).to(flat.dtype) for _, e in tensors]
    values = torch.cat(parts).tolist()
    routed, at = values[: flat.numel()], flat.numel()
    read: dict[int, list[int]] = {}
    for (i, _), part in zip(tensors, parts[1:]):
        read[i] = values[at : at + part.numel()]
        at += part.numel()
    return routed, [(nxt, read[i] if i in read else list(e)) for i, (nxt, e) in enumerate(predictions)]


def _wait_landed(ring, slot: Slot, transport: Transport, what: str):  # noqa: ANN001, ANN202
    """`SlotRing.land`'s wait alone (no views: the grouped path reads the slot through the stacks)."""
    try:
        return transport.wait(slot.ready)
    except BaseException as exc:
        ring.forget(slot)
        if isinstance(exc, TransferError) or not isinstance(exc, Exception):
            raise
        raise TransferError(f"copying {what} to the device failed: {exc}") from exc


def check_moe_transport(transport: Transport) -> None:
    if transport.zero_copy:
        raise ConfigError(
            "MoE expert streaming needs a transport that copies (cuda, copy, simulated-link): "
            "zero-copy would compute every expert from host memory, with no cache to measure"
        )
