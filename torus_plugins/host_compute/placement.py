"""The host placement of one engine: measured costs, the split and switch it implies, and set-up.

`plan_host` runs while the engine plans (before any weight moves), so a bad setting or a layout the
host cannot compute fails with the model untouched; `HostPlacement.start` runs once everything is
placed: it sets the host thread count, turns MoE host experts on, and proves every host unit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bandwidth import probe_bandwidth
from ..config import TorusConfig, parse_bandwidth
from ..errors import ConfigError
from ..planning.host_split import HostCosts, TokenCosts, balanced_rows, host_rows, max_host_tokens, predict
from . import native
from .dense import SPLIT_ALIGN, HostLayers, hidden_size
from .kernels import HostComputeError
from .probe import HostProbe, probe_host

log = logging.getLogger(__name__)

#: How far a host-computed unit may be from the streamed one, relative to the largest output, by
#: arithmetic: weights as loaded in fp32 differ only by the split's summation order; 16-bit weights
#: and quantized kernels (bf16 activations, the host share quantized on its own) by rounding.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LOW_PRECISION_TOLERANCE = 3e-2
QUANT_TOLERANCE = {"int8": 3e-2, "int4": 1.5e-1}


def tolerance(dtype: torch.dtype, quant: str | None) -> float:
    if quant is not None:
        return QUANT_TOLERANCE[quant]
    return TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)


@dataclass
class HostPlacement:
    """rows: host neurons per host-placed dense layer; max_tokens: the per-pass switch; costs and
    probe: the measurements behind them (None where config fixed everything); kernel / act: the
    host kernel for quantized weights and its activation dtype."""

    mode: str
    rows: dict[int, int]
    intermediate: int
    hidden: int
    align: int
    max_tokens: int
    kernel: str
    act: torch.dtype | None
    dtype: torch.dtype
    quant: str | None
    costs: HostCosts | None = None
    probe: HostProbe | None = None
    predicted: TokenCosts | None = None
    skipped: list[int] = field(default_factory=list)
    _threads: int | None = None

    def layers(self, device: torch.device, config: TorusConfig) -> HostLayers:
        return HostLayers(device, self.quant, config.quant_group_size, self.kernel, self.act, self.max_tokens)

    def start(self, engine: Any) -> None:
        threads = engine.config.host_threads
        if threads is None and engine.device.type == "cuda":
            threads = max(1, (os.cpu_count() or 2) - 1)
        if threads is not None:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        if engine.experts is not None:
            engine.experts.enable_host(self.max_tokens, self.kernel, self.act)
        bound = tolerance(self.dtype, self.quant)
        refused: list[str] = []
        with engine.pass_lock:
            try:
                if engine.host is not None:
                    engine.host.verify(engine.sites, self.dtype, bound)
                    refused += engine.host.refused.values()
                if engine.experts is not None:
                    try:
                        engine.experts.verify_host(bound)
                    except HostComputeError as exc:
                        engine.experts.disable_host()
                        refused.append(str(exc))
            finally:
                engine._reset_stats()
        if refused and self.mode == "all":
            raise HostComputeError(
                "host_compute='all' cannot place every unit on the host: "
                + "; ".join(dict.fromkeys(refused))
                + ". Use host_compute='auto' (those units stream) or 'off'"
            )
        for reason in dict.fromkeys(refused):
            log.warning("torus-sparse: host compute refused, streaming instead: %s", reason)

    def stop(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "host_layers": sorted(self.rows),
            "host_share": (sum(self.rows.values()) / (len(self.rows) * self.intermediate)) if self.rows else 0.0,
            "max_tokens": self.max_tokens,
            "kernel": self.kernel,
            "act_dtype": str(self.act).removeprefix("torch.") if self.act else None,
            "link_bps": self.costs.link_bps if self.costs else None,
            "host_ffn_bps": self.costs.host_bps if self.costs else None,
            "host_memory_bps": self.costs.memory_bps if self.costs else None,
            "predicted_ffn_s_per_token": None if self.predicted is None else vars(self.predicted),
        }


def split_align(quant: str | None, group: int) -> int:
    """Neurons per block of a split (int4 host shares also end on a group boundary)."""
    return SPLIT_ALIGN if quant != "int4" else max(SPLIT_ALIGN, group)


def choose_kernel(config: TorusConfig, probe: HostProbe | None, dtype: torch.dtype) -> tuple[str, torch.dtype | None]:
    """The host kernel for `config.weight_quant` weights: as configured, or the probe's fastest.
    Weights as loaded: PyTorch's linear ("raw"), or for a bf16 model our bf16 kernel where the
    probe found it faster ("auto") or it was asked for ("native")."""
    quant = config.weight_quant
    if quant is None:
        if dtype != torch.bfloat16 or config.host_kernel not in ("auto", "native"):
            return "raw", None
        if config.host_kernel == "native":
            why = native.unavailable()
            if why is not None:
                raise ConfigError(f"host_kernel='native': {why}. Use host_kernel='auto' (PyTorch's kernels)")
            return "bf16native", None
        assert probe is not None
        return probe.kernel, probe.act_dtype
    packed = "int8pack" if quant == "int8" else "int4pack"
    if config.host_kernel == "native":
        why = native.unavailable()
        if why is not None:
            raise ConfigError(f"host_kernel='native': {why}. Use host_kernel='auto' (PyTorch's kernels)")
        return f"{quant}native", None
    if config.host_kernel == "packed":
        return packed, dtype
    if config.host_kernel == "packed-bf16":
        return packed, torch.bfloat16
    if config.host_kernel == "dequantize":
        return "dequantize", None
    assert probe is not None
    return probe.kernel, probe.act_dtype


def _shapes(engine: Any) -> tuple[int, int, torch.dtype] | None:
    """(hidden, intermediate, dtype) of the FFN units that may go to the host."""
    reasons = []
    for i in engine.plan.streamed:
        site = engine.sites[i]
        if site.entry is site.exit:
            ps = engine._params[i]
            try:
                hidden = hidden_size(site.entry, ps)
            except HostComputeError as exc:
                reasons.append(str(exc))
                continue
            inter = next((d for p in ps if p.dim() == 2 for d in p.shape if d != hidden), hidden)
            return hidden, inter, ps[0].dtype
    if reasons and engine.config.host_compute == "all":
        raise HostComputeError(
            f"host_compute='all' cannot place FFN layers on the host: {reasons[0]}. "
            f"Use host_compute='auto' (those layers stream) or 'off'"
        )
    if reasons:
        log.warning("torus-sparse: host compute refused, streaming instead: %s", reasons[0])
    for site in engine.expert_sites:
        w = getattr(site.module, site.params[0][1])
        hidden = int(getattr(getattr(engine.model, "config", None), "hidden_size", 0) or w.shape[-1])
        others = [d for _, attr in site.params for d in getattr(site.module, attr).shape[1:] if d != hidden]
        return hidden, (min(others) if others else hidden), w.dtype
    return None


def plan_host(engine: Any) -> HostPlacement | None:
    """The host placement for `engine` (planning only: nothing is moved), or None when off."""
    config: TorusConfig = engine.config
    if config.host_compute == "off":
        return None
    if engine.transport.zero_copy:
        raise ConfigError(
            "host_compute needs a transport that copies (cuda, copy, simulated-link): with zero-copy every "
            "FFN layer already computes from the host store"
        )
    shapes = _shapes(engine)
    if shapes is None:
        return None  # nothing streams: nothing for the host to compute
    hidden, inter, dtype = shapes
    quant, group = config.weight_quant, config.quant_group_size
    align = split_align(quant, group)
    fixed_split = config.host_compute == "all" or config.host_share is not None
    choose = config.host_kernel == "auto" and (quant is not None or dtype == torch.bfloat16)
    need_probe = choose or not fixed_split or config.host_max_tokens is None
    probe = costs = None
    if need_probe:
        probe = probe_host(hidden, inter, dtype, quant, group)
        link = config.options.get("link_bandwidth")
        link_bps = (
            parse_bandwidth(link, "options['link_bandwidth']") if link is not None else probe_bandwidth(engine.device)
        )
        costs = HostCosts(link_bps, probe.ffn_bps, probe.ffn_bps_at, probe.probe_tokens, probe.memory_bps)
    kernel, act = choose_kernel(config, probe, dtype)
    dense = [i for i in engine.plan.streamed if engine.sites[i].entry is engine.sites[i].exit]
    skipped = [i for i in engine.plan.streamed if i not in dense]
    if skipped:
        log.warning(
            "torus-sparse: FFN layers %s keep their linears on the decoder layer itself (no FFN module): "
            "they stream; host compute needs one FFN module per layer",
            skipped,
        )
    rows: dict[int, int] = {}
    shares: list[float] = []
    for i in dense:
        share: float | None
        if config.host_compute == "all":
            share = 1.0
        elif config.host_share is not None:
            share = float(config.host_share)
        else:
            assert costs is not None
            share = None
        if share is None:
            r = balanced_rows(costs, engine.transfer_bytes[i], engine.transfer_bytes[i], inter, align)
        else:
            r = host_rows(share, inter, align)
        if r:
            rows[i] = r
        shares.append(r / inter)
    if config.host_max_tokens is not None:
        max_tokens = config.host_max_tokens
    else:
        assert costs is not None
        # A dense layer's share, or (MoE) one expert: copied vs computed for the tokens routed to it.
        b = engine.transfer_bytes[dense[0]] if dense else engine.expert_plan.slot_bytes
        s = max(shares) if shares else 1.0
        max_tokens = max_host_tokens(costs, s, b, b) if b else 1
    predicted = None
    if costs is not None and dense:
        nbytes = [engine.transfer_bytes[i] for i in dense]
        predicted = predict(costs, nbytes, nbytes, shares)
    return HostPlacement(
        config.host_compute,
        rows,
        inter,
        hidden,
        align,
        max_tokens,
        kernel,
        act,
        dtype,
        quant,
        costs,
        probe,
        predicted,
        skipped,
    )


__all__ = ["HostPlacement", "plan_host", "HostComputeError", "choose_kernel", "split_align", "tolerance"]
