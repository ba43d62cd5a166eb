"""Host placement of dense FFN layers: whole layers, or the host share of a split layer.

Per host-placed layer the FFN module's `forward` is wrapped (not hooked: the wrapper must choose
between two computations and always collect the host's result, whatever the device side raises):
- a pass the host serves (autograd off, at most `max_tokens` tokens) computes the host share on the
  host twin — on the calling thread for a whole layer (the device would only wait); for a split
  layer at the same time as the device share, streamed as a unit of its own (the first neurons'
  rows and columns) and computed through the module: on an accelerator the calling thread queues
  the device share, then computes the host share itself; on a CPU device (whose share blocks the
  calling thread) the host share runs on the worker. The shares are summed on the device;
- any other pass streams the whole layer through the slot ring exactly as without host compute, so
  prefill and training are bit-identical to streaming-only.
bf16 weights as loaded compute through `native.bf16_linear` where the probe found it faster than
PyTorch's (kernel "bf16native"). A layer whose FFN is proven to be `down(act(gate(x)) * up(x))` on native weights computes in one
native call (`fused`) instead of through its twin. Every host layer is proven at attach (`verify`):
one random token through both paths must agree within the bound of its arithmetic, or the engine
refuses (or, under "auto", keeps streaming).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..guards import ForwardOverride, check_traceable_call
from .fused import GatedFFN, recognize
from .kernels import HostComputeError, HostLinearMode, HostWeight, in_place_weight, stand_in, stored_weight
from .split import Cut, find_cut
from .staging import Staging
from .twin import host_twin
from .worker import HostWorker, timed

#: Neurons per block of a split: int4pack wants rows in multiples of 16 (int4 also aligns to its group).
SPLIT_ALIGN = 16


@dataclass
class HostCounters:
    calls: int = 0
    host_s: float = 0.0


@dataclass
class HostLayer:
    layer: int
    rows: int  # neurons computed on the host
    intermediate: int
    hidden: int
    twin: nn.Module
    mode: HostLinearMode | None
    share_unit: int | None = None  # the device share's unit in the host store (split layers)
    share_tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    fused: GatedFFN | None = None  # the whole host share in one native call (`fused.recognize`)

    @property
    def whole(self) -> bool:
        return self.rows >= self.intermediate


def hidden_size(module: nn.Module, params: Sequence[nn.Parameter]) -> int:
    """The FFN's hidden size: the one weight dimension for which a token goes in and comes out with
    that width (run on the module's own weights, before anything is rebound)."""
    dims = sorted({d for p in params if p.dim() == 2 for d in p.shape})
    p0 = params[0]
    found = []
    for d in dims:
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, d, dtype=p0.dtype, device=p0.device))
        except Exception:
            continue
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (1, d):
            found.append(d)
    if len(found) != 1:
        raise HostComputeError(
            f"cannot tell the hidden size of {type(module).__name__} (weight dimensions {dims}: "
            f"{len(found)} of them map one token to itself)"
        )
    return found[0]


class HostLayers:
    """The host-placed dense layers of one engine, their twins, counters and the worker."""

    def __init__(
        self, device: torch.device, quant: str | None, group: int, kernel: str, act: torch.dtype | None, max_tokens: int
    ) -> None:
        self.device, self.quant, self.group = device, quant, group
        self.kernel, self.act = kernel, act
        self.max_tokens = max_tokens
        self.layers: dict[int, HostLayer] = {}
        self.counters: dict[int, HostCounters] = {}
        self.worker = HostWorker(device)
        self.staging = Staging(device)  # how hidden states cross: one host sync per layer
        self.streamer: Any = None
        self._wraps: list[ForwardOverride] = []
        self.force_stream = False  # `verify`'s reference path
        #: layers the plan put on the host that cannot compute there (why): they stream
        self.refused: dict[int, str] = {}

    # ------------------------------------------------------------------ set-up
    def prepare(
        self,
        i: int,
        module: nn.Module,
        names: list[str],
        params: list[nn.Parameter],
        packed: Any,
        buffer: torch.Tensor,
        rows: int,
        values: list[torch.Tensor] | None = None,
    ) -> None:
        """Set layer i up for host compute: a twin of its FFN module bound to the host share of its
        weights in the host store (`packed` / `buffer`: the layer as just stored; `values`: the
        weights as loaded, default the `params`' own data -- a lean-loaded model's are empty). Split layers also keep their device share's tensors, packed
        into the store by `add_share_units`."""
        try:
            hidden = hidden_size(module, params)
        except HostComputeError as exc:  # e.g. an FFN whose forward takes the residual too (BLOOM)
            self.refused[i] = str(exc)
            return
        inter = next((d for p in params if p.dim() == 2 for d in p.shape if d != hidden), hidden)
        cut: Cut | None = None
        if rows < inter:
            try:
                cut = find_cut([tuple(p.shape) for p in params], hidden)
            except HostComputeError as exc:  # a fused gate_up, say: the layer keeps streaming
                self.refused[i] = str(exc)
                return
        start = inter - rows if cut is not None else 0
        twin, fresh = host_twin(module, params)
        stored = packed.transfer.views(buffer)
        compute = packed.compute.views(buffer) if not packed.quantized else None
        weights: dict[int, HostWeight] = {}
        for k, (f, (mode, ti, si)) in enumerate(zip(fresh, packed.recipe)):
            dim = cut.dims[k] if cut is not None else None
            if dim == -1:  # the output bias: added once, by the device share
                f.data = torch.zeros_like(stored[ti], device="cpu")
                continue
            if mode == "raw":
                t = compute[k] if compute is not None else stored[ti]
                t = t if dim is None else (t[start:] if dim == 0 else t[:, start:])
                hw = in_place_weight(t, self.kernel)  # the stored bytes themselves, through our kernel
                if hw is not None:
                    f.data = stand_in(hw, f.dtype)
                    weights[id(f)] = hw
                else:
                    f.data = t
                continue
            span = slice(start, None)
            hw = stored_weight(
                stored[ti],
                stored[si],
                mode,
                self.kernel,
                self.act,
                f.dtype,
                rows=span if dim == 0 else slice(None),
                cols=span if dim == 1 else slice(None),
            )
            f.data = stand_in(hw, f.dtype)  # memory-free: the mode computes
            weights[id(f)] = hw
        share: list[tuple[str, torch.Tensor]] = []
        if cut is not None:
            loaded = values if values is not None else [p.data for p in params]
            device_part = cut.share(loaded, 0, start, device_share=True)
            share = [(n + ".share", t.detach().to("cpu").clone()) for n, t in zip(names, device_part)]
        mode_ = HostLinearMode(weights) if weights else None
        fused = recognize(twin, mode_, hidden, params[0].dtype)
        self.layers[i] = HostLayer(i, rows, inter, hidden, twin, mode_, share_tensors=share, fused=fused)
        self.counters[i] = HostCounters()

    def add_share_units(self, store: Any) -> dict[int, int | None]:
        """Pack each split layer's device share into the host store (after every full layer, so
        unit i is still layer i); returns the unit each host layer streams in a host pass."""
        units: dict[int, int | None] = {}
        for i, hl in self.layers.items():
            if hl.share_tensors:
                store.add_layer(hl.share_tensors)
                hl.share_unit = len(store.layers) - 1
                hl.share_tensors = []
            units[i] = hl.share_unit
        return units

    def install(self, sites: Sequence[Any], streamer: Any) -> list[ForwardOverride]:
        self.streamer = streamer
        for i in self.layers:
            self._wraps.append(ForwardOverride(sites[i].entry, functools.partial(self._forward, i)))
        return list(self._wraps)

    # ------------------------------------------------------------------ hot path
    def host_pass(self, x: torch.Tensor) -> bool:
        return not self.force_stream and not torch.is_grad_enabled() and x.numel() <= self.max_tokens * x.shape[-1]

    def _forward(self, i: int, inner: Any, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None  # the only call shape `verify` proved
        streamer = self.streamer
        if i in self.refused or not (isinstance(x, torch.Tensor) and self.host_pass(x)):
            streamer.host_mode = False
            streamer.acquire(i)
            try:
                return inner(*args, **kwargs)
            finally:
                streamer.release(i)
        streamer.host_mode = True
        hl, c = self.layers[i], self.counters[i]
        staging = self.staging
        if hl.share_unit is None:  # the whole layer on the host: nothing for the device to do meanwhile
            check_traceable_call(self.device)
            y, seconds = timed(self._host, hl, staging.to_host(x))  # the layer's one host sync
            c.calls += 1
            c.host_s += seconds
            streamer.skip(i)
            return staging.to_device(y)
        if self.device.type == "cpu":
            # The device share computes on this thread and blocks it: the host share needs the worker.
            pending = self.worker.submit(self._host, hl, staging.to_host(x))
            try:
                streamer.acquire(i, hl.share_unit)
                try:
                    y = inner(*args, **kwargs)
                finally:
                    streamer.release(i)
            finally:
                yh, seconds = pending.result()  # always collected: the worker never outlives the pass
        else:
            # An accelerator queues the device share's kernels and returns: this thread computes the
            # host share while they run. No thread hand-off per layer, and one OpenMP pool (a
            # worker's own pool would make libgomp put idle threads to sleep: `cpu_threads`).
            xh = staging.to_host(x)  # the layer's one host sync
            streamer.acquire(i, hl.share_unit)
            try:
                y = inner(*args, **kwargs)
            finally:
                streamer.release(i)
            yh, seconds = timed(self._host, hl, xh)
        c.calls += 1
        c.host_s += seconds
        return y + staging.to_device(yh)

    @staticmethod
    def _host(hl: HostLayer, x: torch.Tensor) -> torch.Tensor:
        if hl.fused is not None:
            return hl.fused(x)
        if hl.mode is None:
            return hl.twin(x)
        with hl.mode:
            return hl.twin(x)

    # ------------------------------------------------------------------ proof / teardown
    def verify(self, sites: Sequence[Any], dtype: torch.dtype, tolerance: float) -> None:
        """Run one random token through each host layer both ways; a layer whose results disagree
        by more than `tolerance` (relative to the largest output), or that fails on the host, is
        refused (`refused` says why) and streams from then on."""
        gen = torch.Generator().manual_seed(0)
        for i, hl in self.layers.items():
            if i in self.refused:
                continue
            x = torch.randn(1, hl.hidden, generator=gen).to(self.device, dtype)
            with torch.no_grad():
                self.force_stream = True
                try:
                    ref = sites[i].entry(x)
                finally:
                    self.force_stream = False
                try:
                    got = sites[i].entry(x)
                except Exception as exc:
                    self.refused[i] = f"FFN layer {i} ({type(sites[i].entry).__name__}) failed on the host: {exc}"
                    continue
            if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
                self.refused[i] = f"FFN layer {i} returned a {type(got).__name__} on the host, not its output"
                continue
            scale = ref.abs().max().item() or 1.0
            err = (got.float() - ref.float()).abs().max().item() / scale
            if not err <= tolerance:
                self.refused[i] = (
                    f"FFN layer {i} ({type(sites[i].entry).__name__}) computed on the host differs from the "
                    f"streamed layer by {err:.2e} of its output (bound {tolerance:.0e}): its neurons are not "
                    f"independent, or its forward uses the weights in a way host compute cannot follow"
                )
        for i in self.refused:
            if self.streamer is not None:
                self.streamer.host_units.pop(i, None)  # prefetch the whole layer, as for any streamed one

    @property
    def fused(self) -> list[int]:
        """The host layers computed by one native call (`fused`)."""
        return [i for i, hl in self.layers.items() if hl.fused is not None and i not in self.refused]

    def reset_stats(self) -> None:
        self.counters = {i: HostCounters() for i in self.layers}

    def teardown(self) -> None:
        for w in self._wraps:
            w.remove()
        self._wraps.clear()
        self.worker.close()
        self.layers.clear()
