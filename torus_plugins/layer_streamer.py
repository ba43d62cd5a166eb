"""The dense hot path: streamed FFN layers rotate through the slot ring, one forward pass at a time.

Per streamed layer and pass: the entry module's pre-hook makes sure the layer is in a slot (a
prefetch hit, or a synchronous load counted as a miss), waits for its copy and points the
parameters at the slot; the exit module's post-hook points them back at a memory-free placeholder,
fences the slot and asks the prefetch policy what to copy next. No pluggy call and no host
synchronisation happen here; the only allocations are the transport's fence objects (CUDA events).
The MoE twin of this class is `moe.streamer.ExpertStreamer`; both share the ring's `fill`/`land`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .architecture import FFNSite
from .guards import check_traceable_call
from .host_store import HostStore
from .prefetch import PrefetchPolicy
from .slots import Slot, SlotRing
from .stalls import StallLedger
from .stats import LayerCounters
from .transfer import Transport


def bind(params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> None:
    """Point each parameter at a tensor (a slot view, a resident buffer or a placeholder)."""
    for p, t in zip(params, tensors):
        p.data = t


class LayerStreamer:
    """Owns the slot ring of the streamed FFN layers, their hooks and their counters."""

    def __init__(
        self,
        sites: list[FFNSite],
        params: list[list[nn.Parameter]],
        placeholders: list[list[torch.Tensor]],
        store: HostStore,
        transport: Transport,
        ring: SlotRing,
        streamed: tuple[int, ...],
        policy: PrefetchPolicy | None,
        device: torch.device,
    ) -> None:
        self.sites, self._params, self._placeholders = sites, params, placeholders
        self.store, self.transport, self.ring = store, transport, ring
        self.streamed, self.policy, self.device = streamed, policy, device
        self.counters = [LayerCounters() for _ in sites]
        self.forward_passes = 0
        self._stalls = StallLedger(self._add_stall)
        self._aliases = bool(getattr(transport, "aliases_source", False))
        self._active: Slot | None = None
        self._active_layer = -1
        self._last_streamed = streamed[-1] if streamed else -1
        #: layers whose FFN forward is wrapped by the host placement (it calls acquire/release
        #: itself), and the unit each streams in a host pass: its device share, or None (whole
        #: layer on the host, nothing to copy)
        self.host_units: dict[int, int | None] = {}
        #: whether the last pass was served by the host: the next pass's prefetches assume the same
        self.host_mode = False

    def start(self) -> list[Any]:
        """Install the per-layer hooks and queue the first copies; returns the hook handles."""
        if not self.streamed or self.policy is None:
            return []
        hooks = []
        for i in self.streamed:
            if i in self.host_units:
                continue
            site = self.sites[i]
            hooks.append(site.entry.register_forward_pre_hook(self._make_pre(i)))
            hooks.append(site.exit.register_forward_hook(self._make_post(i)))
        self._prefetch(tuple(self.policy.warmup()))
        return hooks

    def _make_pre(self, layer: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            self.acquire(layer)

        return pre

    def _make_post(self, layer: int) -> Callable[..., None]:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            self.release(layer)

        return post

    # ------------------------------------------------------------------ hot path
    def acquire(self, layer: int, unit: int | None = None) -> None:
        """Make `layer`'s weights computable: a prefetch hit, or a synchronous load (a miss).
        `unit`: what to bind, when not the whole layer (a split layer's device share)."""
        check_traceable_call(self.device)
        if self._active is not None:
            # The previous layer never reached its exit hook (an exception or an interrupt
            # inside its forward): release it now so its slot is fenced and reusable.
            self.release(self._active_layer)
        unit = layer if unit is None else unit
        ring = self.ring
        c = self.counters[layer]
        slot = ring.find(unit)
        if slot is None:
            slot = ring.victim((), None)
            assert slot is not None, "a ring with no active slot always has a victim"
            c.bytes_moved += ring.fill(slot, unit, self.store.source(unit), self.transport)
            c.misses += 1
        else:
            c.hits += 1
        source = self.store.buffers[unit] if self._aliases else None
        what = f"FFN layer {layer}" if unit == layer else f"the device share of FFN layer {layer}"
        views, waited = ring.land(slot, unit, self.transport, source, what)
        self._stalls.record(layer, waited)
        bind(self._params[layer], views.bind)
        self._active, self._active_layer = slot, layer

    def release(self, layer: int) -> None:
        """Unbind `layer`, fence its slot behind its readers, and start the next copies."""
        slot = self._active
        if slot is None or self._active_layer != layer:
            return
        bind(self._params[layer], self._placeholders[layer])
        slot.free = self.transport.compute_fence()
        self.ring.touch(slot)
        self._active = None
        if layer == self._last_streamed:
            self.forward_passes += 1
        assert self.policy is not None
        self._prefetch(self.policy.after(layer))

    def skip(self, layer: int) -> None:
        """`layer` ran wholly on the host this pass: nothing to bind, but the pass moves on."""
        if layer == self._last_streamed:
            self.forward_passes += 1
        assert self.policy is not None
        self._prefetch(self.policy.after(layer))

    def _unit(self, layer: int) -> int | None:
        """What a prefetch of `layer` copies: in a host pass, a host layer's device share (or
        nothing); otherwise the layer."""
        if self.host_mode and layer in self.host_units:
            return self.host_units[layer]
        return layer

    def _prefetch(self, wanted: Sequence[int]) -> None:
        ring = self.ring
        units = [(layer, self._unit(layer)) for layer in wanted]
        keep = tuple(u for _, u in units if u is not None)
        for layer, unit in units:
            if unit is not None and ring.find(unit) is None:
                slot = ring.victim(keep, self._active)
                if slot is None:
                    return
                self.counters[layer].bytes_moved += ring.fill(slot, unit, self.store.source(unit), self.transport)

    # ------------------------------------------------------------------ stats / teardown
    def _add_stall(self, layer: int, seconds: float) -> None:
        self.counters[layer].stall_s += seconds

    def settle(self) -> None:
        """Fold device-side stall timings into the counters (synchronises: stats only)."""
        self._stalls.settle()

    def reset_stats(self) -> None:
        self._stalls.settle()
        self.counters = [LayerCounters() for _ in self.sites]
        self.forward_passes = 0

    def stop(self) -> None:
        """Forget the active layer (teardown rebinds every parameter itself)."""
        self._active = None
