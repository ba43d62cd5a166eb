"""The engine of one attached model: plans, places weights, and tears down; the hot paths are its
streamers (`layer_streamer.LayerStreamer` for dense FFN layers, `moe.streamer.ExpertStreamer` for MoE
experts), and its stats are their counters.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .architecture import Architecture, FFNSite
from .config import TorusConfig
from .disk_tier import plan_disk_tier
from .errors import ConfigError, IncompatibleModelError
from .guards import PassLock, freeze_grads, lock_points, restore_grads
from .host_compute.placement import HostPlacement, plan_host
from .host_store import HostStore, materialize
from .ineffective import ineffective_settings
from .layer_streamer import LayerStreamer, bind
from .moe.streamer import (
    ExpertStreamer,
    check_moe_transport,
    expert_param_ids,
    plan_experts,
    predict_context,
    unit_packing,
)
from .os_memory import release_free_heap, release_pages
from .planning.residency import ResidencyPlan, plan_residency
from .planning.sizes import measure
from .plugins import Registry
from .prefetch import PrefetchContext
from .progress import Step, step
from .slots import SlotRing
from .stats import EngineStats, LayerStats, StatsEvent
from .store_file import store_directory
from .transfer import Transport, TransportOptions
from .weight_source import ParamReader, WeightSource, unmeta

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (try 'cpu', 'cuda', 'cuda:1')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for CUDA but torch sees no GPU; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _placeholder(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor with `t`'s shape and dtype that owns one element: what an unbound parameter shows."""
    return torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)


@dataclass
class _Origin:
    """Where a tensor was before attach, so detach can put it back."""

    owner: nn.Module
    attr: str
    is_param: bool
    device: torch.device


class Engine:
    """Owns the host store, the device buffers, the hooks and the counters of one model."""

    def __init__(
        self,
        model: nn.Module,
        arch: Architecture,
        config: TorusConfig,
        registry: Registry,
        weights: WeightSource | None = None,
    ) -> None:
        self.model = model
        #: reads an FFN parameter's values: its own, or the weight source's for an empty one
        self.read = ParamReader(model, weights)
        self.arch = arch
        self.config = config
        self._registry = registry
        self.device = resolve_device(config.device)
        # MoE: routed experts stream one expert at a time through their own cache.
        self.expert_sites = list(arch.expert_sites(model)) if hasattr(arch, "expert_sites") else []
        self.experts: ExpertStreamer | None = None
        #: held across each forward pass (see `guards`): threads take turns, each pass whole
        self.pass_lock = PassLock()
        self.transport = self._make_transport()
        try:
            self._prepare()
        except BaseException:
            self.transport.close()
            raise

    # ------------------------------------------------------------------ set-up
    def _make_transport(self) -> Transport:
        name = self.config.transport
        if name == "auto":
            # A CPU MoE model copies experts into its cache (the same logic CUDA runs), so
            # hit rates and bytes mean the same thing on both.
            name = "cuda" if self.device.type == "cuda" else ("copy" if self.expert_sites else "zero-copy")
        factory = self._registry.lookup("transport", name)
        return factory(TransportOptions(self.device, self.config.transfer_timeout_s, dict(self.config.options)))

    def _prepare(self) -> None:
        """Measure and plan without touching the model, so a planning error leaves it unchanged."""
        quant, group = self.config.weight_quant, self.config.quant_group_size
        if quant is not None and self.transport.zero_copy:
            raise ConfigError(
                f"weight_quant={quant!r} needs a transport that copies (cuda, copy, simulated-link); "
                f"zero-copy never moves bytes, so there is nothing to shrink"
            )
        if self.expert_sites:
            check_moe_transport(self.transport)
        expert_ids = expert_param_ids(self.expert_sites)
        sizes = measure(self.model, self.arch, quant, group, expert_ids)
        self.sizes = sizes
        if sizes.shared:
            log.warning(
                "torus-sparse: %d FFN layer(s) (%s) share weights with another module; they stay on the "
                "device with the non-FFN weights instead of streaming",
                len(sizes.shared),
                ", ".join(map(str, sizes.shared)),
            )
        self.sites: list[FFNSite] = sizes.sites
        self._params = sizes.params
        self._ffn_ids = {id(p) for ps in sizes.params for p in ps} | expert_ids
        empty = [n for n, p in self.model.named_parameters() if p.is_meta and id(p) not in self._ffn_ids]
        if empty:
            raise IncompatibleModelError(
                f"{type(self.model).__name__} has {len(empty)} empty (meta) parameters outside its streamed FFN "
                f"layers (first {empty[0]!r}): a weight source can only stand in for FFN weights. Load the model "
                f"with its other weights in memory"
            )
        #: device bytes of each FFN layer in its compute dtype (what a resident layer costs)
        self.layer_bytes = sizes.layer_bytes
        #: bytes one transfer of each layer moves (quantized when weight_quant is set)
        self.transfer_bytes = sizes.transfer_bytes
        self.non_ffn_bytes = non_ffn = sizes.non_ffn_bytes
        kv = sizes.kv_bytes_per_token * self.config.kv_reserve_tokens
        budget = self.config.budget_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.9)
        self._policy_factory = self._registry.lookup("prefetch", self.config.prefetch)
        if self.transport.zero_copy:
            # Zero-copy computes from the host store: nothing is resident and nothing streams.
            self.plan = ResidencyPlan((), tuple(range(len(self.sites))), 0, 0, non_ffn, kv, budget)
        else:
            self.plan = plan_residency(
                sizes.layer_bytes,
                non_ffn,
                kv,
                budget,
                self.config.lookahead,
                self.config.resident_layers,
                sizes.slot_bytes,
            )
        if self.expert_sites:
            left = None if budget is None else budget - self.plan.device_bytes(self.layer_bytes) - kv
            self.expert_plan, _ = plan_experts(self.expert_sites, self.config, left)
            factory = self._registry.lookup("moe_predictor", self.config.moe_predictor)
            # Built now, so a bad predictor file fails before any weight moves.
            ctx = predict_context(self.model, self.arch, self.expert_sites, self.config)  # type: ignore[arg-type]
            self._expert_predictor = factory(ctx)
            self._prefetch_k = ctx.prefetch_k
        #: the host placement's plan (None with host_compute="off")
        self.host_plan: HostPlacement | None = None
        if self.config.host_compute != "off":
            with step("measuring the host for the host placement"):
                self.host_plan = plan_host(self)
        #: host_budget's split (dense store bytes, expert store bytes), None: both stores in memory
        self.disk_shares = self._plan_disk_tier()
        #: settings that take no effect here, each with why (`EngineStats.ineffective`)
        self.ineffective: list[str] = ineffective_settings(self)
        for why in self.ineffective:
            log.warning("torus-sparse: %s", why)

    def _plan_disk_tier(self) -> tuple[int, int] | None:
        config = self.config
        if config.host_budget is None:
            return None
        why = None
        if self.transport.zero_copy:
            why = "the zero-copy transport computes from the store in place; use transport='copy' or 'cuda'"
        elif config.host_compute != "off":
            why = "the host placement computes from the store's memory; use host_compute='off'"
        elif config.store_cache is None:
            why = "the store must live in a file; set store_cache ('auto' or a directory)"
        if why is not None:
            raise ConfigError(f"host_budget keeps the host store on disk, which does not work here: {why}")
        streamed = [self.transfer_bytes[i] for i in self.plan.streamed]
        unit, experts, top_k = 0, 0, 0
        if self.expert_sites:
            unit = unit_packing(self.expert_sites, config.weight_quant, config.quant_group_size).transfer.nbytes
            experts = sum(s.num_experts for s in self.expert_sites)
            top_k = max(s.top_k for s in self.expert_sites)
        return plan_disk_tier(config.host_budget, streamed, unit, experts, top_k, config.lookahead)

    def build(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Pack FFN weights into the host store, place everything, install hooks, warm the ring.

        progress(done, total) is called after each layer is packed. If anything fails half-way
        (out of memory, say), everything done so far is undone and the error re-raised.
        """
        self._hooks: list[Any] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []
        self._non_ffn_origins: list[_Origin] = []
        self._ffn_origin_device: list[torch.device] = []
        self._resident: dict[int, torch.Tensor] = {}
        self.host = self.host_plan.layers(self.device, self.config) if self.host_plan is not None else None
        pin = self.config.pin_memory if self.config.pin_memory is not None else self.device.type == "cuda"
        if pin and not torch.cuda.is_available():
            log.warning("pin_memory=True needs CUDA, which torch does not see; the host store stays pageable")
            pin = False
        # Quantize on the GPU when there is one: int4's code search takes minutes for a 7B model
        # on a few CPU cores; the results still land in the host store.
        qdev = self.device if self.device.type == "cuda" else None
        if self.disk_shares is not None:
            pin = False  # a mapped file's pages come and go: nothing to page-lock (see disk_tier)
        self.store = HostStore(pin, self.config.weight_quant, self.config.quant_group_size, qdev)
        if self.disk_shares is not None:
            n = len(self._params)
            ahead = self.config.lookahead
            self.store.use_disk_tier(self.disk_shares[0], lambda i: [(i + d) % n for d in range(1, ahead + 1)])
        if self.device.type == "cuda":
            # So `peak_device_bytes` reads "since attach" (reset_stats resets it again).
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            # Everything built here (host buffers, slots, cached views) outlives this call: made
            # inside inference mode it would be an inference tensor, which a later no-grad or
            # grad-enabled pass may neither write nor save for backward.
            with torch.inference_mode(False):
                self._build(progress)
        except BaseException:
            self.teardown()
            raise
        # The model's FFN tensors (and quantizing's temporaries) were just freed: hand glibc's
        # freed heap back to the OS, or a 3B model's process keeps ~4 GiB it no longer uses.
        release_free_heap()
        # If the model is garbage-collected while attached, let queued copies finish before the
        # host buffers they read are freed (and unregistered). Holds no reference to the model.
        self._finalizer = weakref.finalize(
            self.model, _drain, self.transport, [self.store] + ([self.experts.store] if self.experts else [])
        )

    def _build(self, progress: Callable[[int, int], None] | None) -> None:
        dev = self.device
        self._freeze_ffn_grads()
        self._placeholders: list[list[torch.Tensor]] = []
        resident = set(self.plan.resident)
        total = len(self.sites)
        if (
            (self.store.quant is not None or self.store.tier is not None)
            and self.config.store_cache is not None
            and total
        ):
            with step("looking for a stored copy of the quantized FFN layers"):
                self.store.use_file(
                    store_directory(self.config.store_cache),
                    "FFN",
                    (
                        [(n, self.read(p)) for (n, _, _), p in zip(self.sites[i].params, ps)]
                        for i, ps in enumerate(self._params)
                    ),
                )
        if total:
            with step(self.store.packing_phase("FFN layers"), total, progress) as packing:
                self._pack_layers(packing, resident)
        if self.store.writing_file:
            with step(f"writing the {self.store.quant} FFN store"):
                self.store.finish()
        else:
            self.store.finish()
        self._move_non_ffn(dev)
        if self.host is not None:
            self._host_units = self.host.add_share_units(self.store)
        self._start_streaming()
        if self.expert_sites:
            self.experts = ExpertStreamer(
                self.model,
                self.arch,  # type: ignore[arg-type]
                self.expert_sites,
                self.expert_plan,
                self.config,
                self.transport,
                dev,
                self._expert_predictor,
                self._prefetch_k,
                self.store.pin_memory and self.disk_shares is None,
                self.read,
                None if self.disk_shares is None else self.disk_shares[1],
            )
            self.experts.build(progress)
        self._install_pass_lock()
        if self.host_plan is not None:
            with step("checking the host placement against streaming"):
                self.host_plan.start(self)
        prepare = getattr(self.arch, "prepare_model", None)
        self._undo_prepare = prepare(self.model) if prepare is not None else None

    def _pack_layers(self, packing: Step, resident: set[int]) -> None:
        """Pack every FFN layer into the host store and bind it where it computes from."""
        dev = self.device
        for i, ps in enumerate(self._params):
            names = [name for name, _, _ in self.sites[i].params]
            # An empty (meta) parameter comes back on the CPU at detach, from the store.
            origin = ps[0].device if not ps[0].is_meta else torch.device("cpu")
            weights = [self.read(p) for p in ps]
            packed, buf = self.store.add_layer(list(zip(names, weights)))
            if self.host is not None and i in self.host_plan.rows:  # type: ignore[union-attr]
                self.host.prepare(i, self.sites[i].entry, names, ps, packed, buf, self.host_plan.rows[i], weights)  # type: ignore[union-attr]
            for w in weights:  # read into the store (and the host share): the checkpoint's pages can go
                release_pages(w)
            del weights
            for p in ps:
                unmeta(p, dev)
            self._ffn_origin_device.append(origin)
            self._placeholders.append([_placeholder(p, dev) for p in ps])
            if self.transport.zero_copy:
                self._bind(i, packed.compute.views(buf))
            elif i in resident:
                # Resident layers live on the device in their compute dtype (dequantized once).
                if packed.quantized:
                    dbuf = torch.empty(packed.compute.nbytes, dtype=torch.uint8, device=dev)
                    materialize(packed, [v.to(dev) for v in packed.transfer.views(buf)], packed.compute.views(dbuf))
                else:
                    dbuf = buf.to(dev)
                self._resident[i] = dbuf
                self.store.drop(i)
                self._bind(i, packed.compute.views(dbuf))
            else:
                self._bind(i, self._placeholders[i])
            packing.advance(i + 1)

    def _freeze_ffn_grads(self) -> None:
        experts = [getattr(site.module, attr) for site in self.expert_sites for _, attr in site.params]
        self._grad_flags = freeze_grads([p for ps in self._params for p in ps] + experts)

    def _install_pass_lock(self) -> None:
        streamed = (
            [] if self.transport.zero_copy else [(self.sites[i].entry, self.sites[i].exit) for i in self.plan.streamed]
        )
        if not streamed and not self.expert_sites:
            return  # nothing rebinds weights or keeps per-pass state: no lock needed
        points = lock_points(self.model, streamed, [s.module for s in self.expert_sites])
        slots = [s.buffer for s in self.streamer.ring.slots]
        if self.experts is not None and self.experts.cache is not None:
            slots += [s.buffer for r in self.experts.cache.rings for s in r.slots]
        self.pass_lock.volatile = {b.untyped_storage().data_ptr() for b in slots}
        self._hooks.extend(self.pass_lock.install(points))

    def _bind(self, layer: int, tensors: list[torch.Tensor]) -> None:
        bind(self._params[layer], tensors)

    def _move_non_ffn(self, dev: torch.device) -> None:
        # One tensor at a time: the device never holds more than the non-FFN weights, and the
        # FFN placeholders never get materialised the way `model.to()` would.
        done: set[int] = set()  # tied weights appear under several modules: move them once
        for mod in self.model.modules():
            for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None or id(t) in self._ffn_ids or id(t) in done:
                    continue
                done.add(id(t))
                is_param = attr in mod._parameters
                self._non_ffn_origins.append(_Origin(mod, attr, is_param, t.device))
                if t.device != dev:
                    if is_param:
                        t.data = t.data.to(dev)
                    else:
                        mod._buffers[attr] = t.to(dev)

    def _start_streaming(self) -> None:
        plan = self.plan
        ring = SlotRing([self.transport.alloc(plan.slot_bytes) for _ in range(plan.n_slots)], self.store.layers)
        streams = bool(plan.streamed) and not self.transport.zero_copy
        policy = None
        if streams:
            ctx = PrefetchContext(plan.streamed, plan.n_slots, self.config.lookahead, dict(self.config.options))
            policy = self._policy_factory(ctx)
        self.streamer = LayerStreamer(
            self.sites,
            self._params,
            self._placeholders,
            self.store,
            self.transport,
            ring,
            plan.streamed if streams else (),
            policy,
            self.device,
        )
        if self.host is not None and streams:
            self.streamer.host_units = dict(self._host_units)
        self._hooks.extend(self.streamer.start())
        if self.host is not None and streams:
            self._hooks.extend(self.host.install(self.sites, self.streamer))

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        """A snapshot of the counters (settles device-side stall timings first). Waits for a
        forward pass running in another thread, so the counters are those of whole passes."""
        with self.pass_lock:
            return self._stats()

    def _stats(self) -> EngineStats:
        self.streamer.settle()
        counters = self.streamer.counters
        resident = set(self.plan.resident)
        placement = "zero-copy" if self.transport.zero_copy else None
        positions = self.sizes.positions
        host = self.host
        host_layers = host.layers if host is not None else {}
        host_counters = host.counters if host is not None else {}

        def where(i: int) -> str:
            if placement:
                return placement
            if i in resident:
                return "resident"
            if i in host_layers and i not in host.refused:  # type: ignore[union-attr]
                return "host" if host_layers[i].whole else "split"
            return "streamed"

        layers = tuple(
            LayerStats(
                positions[i],
                where(i),
                c.hits,
                c.misses,
                c.bytes_moved,
                c.stall_s,
                host_counters[i].calls if i in host_counters else 0,
                host_counters[i].host_s if i in host_counters else 0.0,
                host_layers[i].rows / host_layers[i].intermediate if where(i) in ("host", "split") else 0.0,
            )
            for i, c in enumerate(counters)
        )
        resident_bytes = sum(self.layer_bytes[i] for i in self.plan.resident)
        experts = self.experts.stats() if self.experts is not None else None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self.plan.device_bytes(self.layer_bytes) + (experts.cache_bytes if experts else 0)
        return EngineStats(
            transport=self.transport.name,
            device=str(self.device),
            lookahead=self.config.lookahead,
            hits=sum(c.hits for c in counters) + (experts.hits if experts else 0),
            misses=sum(c.misses for c in counters) + (experts.misses if experts else 0),
            bytes_moved=sum(c.bytes_moved for c in counters) + (experts.bytes_moved if experts else 0),
            stall_s=sum(c.stall_s for c in counters) + (experts.stall_s if experts else 0.0),
            forward_passes=experts.forward_passes if experts else self.streamer.forward_passes,
            resident_layers=len(self.plan.resident),
            streamed_layers=0 if self.transport.zero_copy else len(self.plan.streamed),
            resident_bytes=resident_bytes,
            streamed_bytes_per_pass=0
            if self.transport.zero_copy
            else sum(self.transfer_bytes[i] for i in self.plan.streamed),
            non_ffn_bytes=self.non_ffn_bytes,
            ring_bytes=self.plan.ring_bytes,
            host_store_bytes=self.store.nbytes,
            peak_device_bytes=peak,
            layers=layers,
            experts=experts,
            host_compute=self.config.host_compute,
            host_layers=len([i for i in host_layers if i not in host.refused]),  # type: ignore[union-attr]
            host_calls=sum(c.calls for c in host_counters.values())
            + (sum(x.host_computed for x in experts.layers) if experts else 0),
            host_s=sum(c.host_s for c in host_counters.values())
            + (sum(x.host_s for x in experts.layers) if experts else 0.0),
            host_max_tokens=self.host_plan.max_tokens if self.host_plan is not None else 0,
            ineffective=tuple(self.ineffective),
        )

    def reset_stats(self) -> None:
        with self.pass_lock:
            self._reset_stats()

    def _reset_stats(self) -> None:
        self.streamer.reset_stats()
        if self.host is not None:
            self.host.reset_stats()
        if self.experts is not None:
            self.experts.reset_stats()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def publish(self, kind: str, **extra: Any) -> None:
        """Tell `torus_stats_event` observers about a coarse moment (never called per token)."""
        name = getattr(getattr(self.model, "config", None), "name_or_path", None) or type(self.model).__name__
        self._registry.emit(StatsEvent(kind, str(name), self.stats(), extra))

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Remove hooks and put every tensor back where it was, bit for bit (with `weight_quant`:
        the dequantized weights, see `detach`); free device buffers."""
        with self.pass_lock, torch.inference_mode(False):
            self._teardown()

    def _teardown(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()  # teardown drains and frees in order itself
        undo = getattr(self, "_undo_prepare", None)
        if undo is not None:
            undo()
            self._undo_prepare = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self, "host", None) is not None:
            self.host.teardown()  # type: ignore[union-attr]
        if self.host_plan is not None:
            self.host_plan.stop()
        try:
            self.transport.close()  # lets in-flight copies finish before their buffers go away
        except Exception:
            log.exception("transport %s failed to close cleanly", self.transport.name)
        streamer = getattr(self, "streamer", None)
        if streamer is not None:
            streamer.stop()
        if self.experts is not None:
            self.experts.teardown()
            self.experts = None
        # Only the layers packed so far (all of them, unless build failed half-way).
        for i in range(len(self._ffn_origin_device)):
            origin = self._ffn_origin_device[i]
            dbuf = self._resident.pop(i, None)
            if dbuf is not None:  # resident: compute layout on the device
                views = self.store.layers[i].compute.views(dbuf)
                restored = [v.clone() if v.device == origin else v.to(origin) for v in views]
            else:  # host store: transfer layout (dequantized when quantized)
                restored = self.store.weights(i, self.store.buffers[i], origin)
            self._bind(i, restored)
            self.store.drop(i)
        self.store.close()  # units past the layers (split layers' device shares), unlocked too
        for o in self._non_ffn_origins:
            t = (o.owner._parameters if o.is_param else o.owner._buffers)[o.attr]
            if t.device != o.device:
                if o.is_param:
                    t.data = t.data.to(o.device)
                else:
                    o.owner._buffers[o.attr] = t.to(o.device)
        restore_grads(self._grad_flags)
        self._grad_flags = []
        if streamer is not None:
            streamer.ring = SlotRing([], [])  # the slots' device memory goes now


def _drain(transport: Transport, stores: list[HostStore]) -> None:
    """Finalizer of a model collected while attached: copies first, then host memory."""
    try:
        transport.close()
    except Exception:  # a finalizer must not raise; the memory is freed either way
        log.exception("transport %s failed to close while its model was collected", transport.name)
    for store in stores:
        store.close()
