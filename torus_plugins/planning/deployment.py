"""Deployment planning: what stays resident, what streams, and the decode speed the link allows.

Uses the same `measure` + `plan_residency` the engine runs at attach, so the plan printed by
`torus-sparse plan` is the placement the engine will choose for the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..config import TorusConfig, format_bytes
from ..errors import BudgetTooSmallError
from .host_split import HostForecast
from .residency import ResidencyPlan, plan_residency
from .sizes import ModelSizes


@dataclass(frozen=True)
class ExpertPlan:
    """A MoE model's routed experts as the engine would place them (`moe.plan_experts`).

    unit_bytes: one expert's bytes over the link (quantized when weight_quant is set);
    cache_slots / cache_bytes: the device expert cache; store_bytes: every expert in the host
    store; miss_bytes_per_token: what one decoded token moves when every routed expert misses the
    cache (top-k per MoE layer): the link-bound floor of the decode speed. A cache that holds
    every expert moves nothing once warm; real hit rates lie between (`benchmarks/moe_cache.py`).
    """

    layers: int
    experts: int
    top_k: int
    unit_bytes: int
    cache_slots: int
    cache_bytes: int
    store_bytes: int
    miss_bytes_per_token: int

    def render(self, bandwidth_bps: float) -> list[str]:
        every = self.cache_slots >= self.experts
        floor = bandwidth_bps / self.miss_bytes_per_token if self.miss_bytes_per_token else float("inf")
        return [
            f"routed experts   {self.layers} MoE layers × {self.experts // max(self.layers, 1)} experts, top-{self.top_k}, "
            f"{format_bytes(self.unit_bytes)} each = {format_bytes(self.store_bytes)} in the host store",
            f"expert cache     {self.cache_slots} of {self.experts} experts = {format_bytes(self.cache_bytes)} on the device"
            + (" (every expert: nothing moves once warm)" if every else ""),
            f"expert misses    at most {format_bytes(self.miss_bytes_per_token)} per token (every routed expert missing): "
            f"{floor:.1f} tok/s link-bound floor; hits raise it",
        ]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeploymentPlan:
    """The answer to "how do I run this model on this device?".

    predicted_tok_s: the link ceiling for batch-1 decode, bandwidth ÷ bytes streamed per token
        (compute time is not modelled: the real speed is at most this, and at most the speed of
        the same model fully resident).
    host_bytes: host memory the engine holds while generating (streamed layers' store).
    host_load_peak_bytes: host memory while loading: with the lean loader (a safetensors
        checkpoint) the non-FFN weights, the store and two FFN layers in flight; else the whole
        model once, plus one layer.
    disk_bps: the disk's read bandwidth, when known: with a `host_budget` below the store, the
        decode speed the disk allows (`disk_tok_s`).
    """

    model: str
    device: str
    config: TorusConfig
    bandwidth_bps: float
    fits: bool
    residency: ResidencyPlan | None
    reason: str | None
    n_layers: int
    non_ffn_bytes: int
    ffn_bytes: int
    kv_reserve_bytes: int
    resident_ffn_bytes: int
    ring_bytes: int
    streamed_bytes_per_token: int
    device_bytes: int
    host_bytes: int
    host_load_peak_bytes: int
    minimum_budget_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the host placement's forecast (measured on this machine), when the planner probed the host
    host: HostForecast | None = None
    #: MoE models: the routed experts' store and device cache
    experts: ExpertPlan | None = None
    disk_bps: float | None = None

    @property
    def disk_bytes_per_token(self) -> int:
        """Bytes read from disk per decoded token when `host_budget` is below the store (0: in RAM).
        A cyclic pass over a store larger than its budget misses every time (the oldest unit is
        always the next one needed): every streamed layer, and every routed expert that misses."""
        budget = self.config.host_budget
        if budget is None or self.host_bytes <= budget:  # type: ignore[operator]
            return 0
        misses = self.experts.miss_bytes_per_token if self.experts is not None else 0
        return self.streamed_bytes_per_token + misses

    @property
    def disk_tok_s(self) -> float | None:
        """The disk-bound decode ceiling (None: no disk tier, or the disk's speed is unknown)."""
        per_token = self.disk_bytes_per_token
        return self.disk_bps / per_token if per_token and self.disk_bps else None

    @property
    def predicted_tok_s(self) -> float:
        if not self.fits or self.streamed_bytes_per_token == 0:
            return float("inf") if self.fits else 0.0
        return self.bandwidth_bps / self.streamed_bytes_per_token

    def config_snippet(self) -> str:
        c = self.config
        parts = [f"vram_budget={_size_literal(c.budget_bytes)}"] if c.budget_bytes else []
        parts.append(f"lookahead={c.lookahead}")
        if c.transport != "auto":
            parts.append(f'transport="{c.transport}"')
        elif c.weight_quant and not self.device.startswith("cuda") and self.experts is None:
            # "auto" is zero-copy on a CPU, which refuses weight_quant (nothing moves to shrink)
            parts.append('transport="copy"')
        if c.weight_quant:
            parts.append(f'weight_quant="{c.weight_quant}"')
        if c.resident_layers is not None:
            parts.append(f"resident_layers={c.resident_layers}")
        if c.host_budget is not None:
            parts.append(f"host_budget={_size_literal(c.host_budget)}")  # type: ignore[arg-type]
        return f"TorusConfig({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "fits": self.fits,
            "reason": self.reason,
            "budget_bytes": self.config.budget_bytes,
            "minimum_budget_bytes": self.minimum_budget_bytes,
            "bandwidth_bps": self.bandwidth_bps,
            "n_layers": self.n_layers,
            "resident_layers": list(self.residency.resident) if self.residency else [],
            "streamed_layers": list(self.residency.streamed) if self.residency else [],
            "n_slots": self.residency.n_slots if self.residency else 0,
            "slot_bytes": self.residency.slot_bytes if self.residency else 0,
            "non_ffn_bytes": self.non_ffn_bytes,
            "ffn_bytes": self.ffn_bytes,
            "kv_reserve_bytes": self.kv_reserve_bytes,
            "resident_ffn_bytes": self.resident_ffn_bytes,
            "ring_bytes": self.ring_bytes,
            "device_bytes": self.device_bytes,
            "streamed_bytes_per_token": self.streamed_bytes_per_token,
            "host_bytes": self.host_bytes,
            "host_load_peak_bytes": self.host_load_peak_bytes,
            "host_budget": self.config.host_budget,
            "disk_bytes_per_token": self.disk_bytes_per_token,
            "disk_bps": self.disk_bps,
            "disk_tok_s": self.disk_tok_s,
            "predicted_tok_s": self.predicted_tok_s,
            "config": self.config_snippet(),
            "host": self.host.as_dict() if self.host is not None else None,
            "experts": self.experts.as_dict() if self.experts is not None else None,
        }

    def render(self) -> str:
        """A plain-text report (the `torus-sparse plan` output)."""
        r = self.residency
        lines = [
            f"model            {self.model}",
            f"device           {self.device}   budget {format_bytes(self.config.budget_bytes) if self.config.budget_bytes else 'unlimited'}",
            f"link bandwidth   {self.bandwidth_bps / 1e9:.1f} GB/s",
            (
                "FFN layers       none dense: every FFN is routed experts"
                if self.experts is not None and not self.n_layers
                else f"FFN layers       {self.n_layers} × {format_bytes(self.ffn_bytes / max(self.n_layers, 1))}"
                + (f" (streamed as {self.config.weight_quant})" if self.config.weight_quant else "")
            ),
            f"always resident  {format_bytes(self.non_ffn_bytes)} non-FFN weights + {format_bytes(self.kv_reserve_bytes)} KV reserve",
        ]
        if self.experts is not None:
            lines += self.experts.render(self.bandwidth_bps)
        if r is None:
            lines.append(f"fits             NO: {self.reason}")
            return "\n".join(lines)
        lines += [
            f"resident FFN     {len(r.resident)} layers {_ranges(r.resident)} = {format_bytes(self.resident_ffn_bytes)}",
            f"streamed FFN     {len(r.streamed)} layers {_ranges(r.streamed)} = {format_bytes(self.streamed_bytes_per_token)} per token",
            f"slot ring        {r.n_slots} × {format_bytes(r.slot_bytes)} = {format_bytes(self.ring_bytes)}",
            f"device memory    {format_bytes(self.device_bytes)} planned (+ KV reserve)",
            f"host memory      {format_bytes(self.host_bytes)} while generating, {format_bytes(self.host_load_peak_bytes)} peak while loading",
            *self._disk_lines(),
            "decode ceiling   "
            + (
                "set by the expert cache's hit rate (see expert misses above)"
                if self.experts is not None and not r.streamed
                else "no streaming: compute-bound"
                if not r.streamed
                else f"{self.predicted_tok_s:.1f} tok/s (link-bound, batch 1, dense FFN layers)"
            ),
            "fits             yes",
            f"use              {self.config_snippet()}",
        ]
        if self.host is not None and r.streamed:
            lines += self.host.render()
            lines.append(f'use (hybrid)     {self.config_snippet()[:-1]}, host_compute="auto")')
        return "\n".join(lines)

    def _disk_lines(self) -> list[str]:
        budget = self.config.host_budget
        if budget is None:
            return []
        if not self.disk_bytes_per_token:
            return [f"disk tier        off: the host store fits in host_budget {format_bytes(budget)}"]
        rate = (
            f"{self.disk_tok_s:.1f} tok/s disk-bound at {self.disk_bps / 1e9:.1f} GB/s"
            if self.disk_tok_s
            else "pass --disk-bandwidth for the disk-bound speed"
        )
        return [
            f"disk tier        the store ({format_bytes(self.host_bytes)}) pages from its file within host_budget "
            f"{format_bytes(budget)}: {format_bytes(self.disk_bytes_per_token)} read from disk per token; {rate}"
        ]


def _size_literal(n: int) -> str:
    """The shortest exact way to write a byte count in a config: "12GB", "6GiB" or 123456."""
    for unit, size in (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6)):
        if n % size == 0:
            return f'"{n // size}{unit}"'
    return str(n)


def _ranges(idx: tuple[int, ...]) -> str:
    if not idx:
        return "[]"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + (None,):  # type: ignore[operator]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "[" + ",".join(out) + "]"


def make_plan(
    sizes: ModelSizes,
    config: TorusConfig,
    bandwidth_bps: float,
    *,
    model: str,
    device: str,
    model_bytes: int | None = None,
    lean: bool = False,
    disk_bps: float | None = None,
) -> DeploymentPlan:
    """Plan placement for `sizes` under `config` (its budget, lookahead, quantization). lean: the
    checkpoint loads lean (FFN weights read one tensor at a time at attach)."""
    kv = sizes.kv_bytes_per_token * config.kv_reserve_tokens
    n = len(sizes.layer_bytes)
    if lean:
        load_peak = sizes.non_ffn_bytes + sum(sizes.transfer_bytes) + 2 * max(sizes.layer_bytes, default=0)
    else:
        load_peak = (model_bytes or sizes.non_ffn_bytes + sizes.ffn_bytes) + max(sizes.transfer_bytes, default=0)
    common = dict(
        model=model,
        device=device,
        config=config,
        bandwidth_bps=bandwidth_bps,
        n_layers=n,
        non_ffn_bytes=sizes.non_ffn_bytes,
        ffn_bytes=sizes.ffn_bytes,
        kv_reserve_bytes=kv,
        host_load_peak_bytes=load_peak,
        disk_bps=disk_bps,
    )
    try:
        r = plan_residency(
            sizes.layer_bytes,
            sizes.non_ffn_bytes,
            kv,
            config.budget_bytes,
            config.lookahead,
            config.resident_layers,
            sizes.slot_bytes,
        )
    except BudgetTooSmallError as exc:
        return DeploymentPlan(
            **common,
            fits=False,
            residency=None,
            reason=str(exc),
            resident_ffn_bytes=0,
            ring_bytes=0,
            streamed_bytes_per_token=0,
            device_bytes=0,
            host_bytes=0,
            minimum_budget_bytes=exc.minimum_bytes,
        )
    streamed = sum(sizes.transfer_bytes[i] for i in r.streamed)
    return DeploymentPlan(
        **common,
        fits=True,
        residency=r,
        reason=None,
        resident_ffn_bytes=sum(sizes.layer_bytes[i] for i in r.resident),
        ring_bytes=r.ring_bytes,
        streamed_bytes_per_token=streamed,
        device_bytes=r.device_bytes(sizes.layer_bytes),
        host_bytes=streamed,
    )


def with_experts(plan: DeploymentPlan, sites: list[Any], lean: bool = False) -> DeploymentPlan:
    """`plan` with a MoE model's routed experts (`sites`, `ExpertSite`s) placed as the engine would:
    the cache gets what the budget leaves after the dense placement and the KV reserve. lean: as
    `make_plan`'s (the expert store then adds to the load peak; else the whole model counted it)."""
    from ..moe.streamer import plan_experts

    if plan.residency is None:
        return plan
    config = plan.config
    budget = config.budget_bytes
    left = None if budget is None else budget - plan.device_bytes - plan.kv_reserve_bytes
    try:
        cache, packed = plan_experts(sites, config, left)
    except BudgetTooSmallError as exc:
        return replace(plan, fits=False, residency=None, reason=str(exc), minimum_budget_bytes=None)
    total = sum(s.num_experts for s in sites)
    top_k = max(s.top_k for s in sites)
    unit = packed.transfer.nbytes
    experts = ExpertPlan(
        layers=len(sites),
        experts=total,
        top_k=top_k,
        unit_bytes=unit,
        cache_slots=cache.slots,
        cache_bytes=cache.nbytes,
        store_bytes=unit * total,
        miss_bytes_per_token=sum(s.top_k for s in sites) * unit,
    )
    return replace(
        plan,
        experts=experts,
        device_bytes=plan.device_bytes + cache.nbytes,
        host_bytes=plan.host_bytes + experts.store_bytes,
        host_load_peak_bytes=plan.host_load_peak_bytes + (experts.store_bytes if lean else 0),
    )
