"""Settings that take no effect on a given model and machine, found at attach.

A user who asks for int4 or a host placement expects memory saved or compute moved; when the plan
makes that impossible (every layer resident, the cost model switching host passes off) the engine
still runs correctly, so nothing fails -- which is why it must be said: once as a warning at
attach and for good in `EngineStats.ineffective`.
"""

from __future__ import annotations

from typing import Any


def _gbs(bps: float) -> str:
    return f"{bps / 1e9:.1f} GB/s"


def ineffective_settings(engine: Any) -> list[str]:
    """Why each setting of `engine.config` that changes nothing here changes nothing (empty: all act)."""
    config, out = engine.config, []
    quant = config.weight_quant
    if quant is not None and not engine.transport.zero_copy and not engine.plan.streamed and not engine.expert_sites:
        out.append(
            f"weight_quant={quant!r} saves nothing here: all {len(engine.plan.resident)} FFN layers stay resident on "
            f"{engine.device}, dequantized once at attach (its rounding error without its memory saving); "
            "set vram_budget or resident_layers so that layers stream, or drop weight_quant"
        )
    plan = engine.host_plan
    if plan is not None and plan.max_tokens == 0:
        costs = plan.costs
        why = (
            f"streaming a layer over the link ({_gbs(costs.link_bps)}) beats computing it on the host "
            f"({_gbs(costs.effective_host_bps)} at one token, measured at attach)"
            if costs is not None
            else "the cost model found streaming faster at every token count"
        )
        out.append(
            f"host_compute={config.host_compute!r} takes no effect: {why}, so every pass streams; "
            "set host_max_tokens=1 to compute decode steps on the host anyway"
        )
    if config.host_budget is not None and getattr(engine, "disk_shares", None) is None:
        from .config import format_bytes

        out.append(
            f"host_budget={format_bytes(config.host_budget)} takes no effect: the host store fits in it, so it stays "
            "in memory (the disk tier starts where the store is larger than the budget)"
        )
    return out
