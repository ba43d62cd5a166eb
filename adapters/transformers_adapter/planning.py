"""`torus-sparse plan` for transformers models: read config and shapes, never the weights."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from torus_plugins import TorusConfig, UnsupportedArchitectureError
from torus_plugins.bandwidth import probe_bandwidth
from torus_plugins.config import parse_bandwidth
from torus_plugins.engine import resolve_device
from torus_plugins.host_compute.placement import choose_kernel, split_align
from torus_plugins.host_compute.probe import probe_host
from torus_plugins.moe.streamer import expert_param_ids
from torus_plugins.planning.deployment import DeploymentPlan, make_plan, with_experts
from torus_plugins.planning.host_split import HostCosts, HostForecast, forecast
from torus_plugins.planning.sizes import measure
from torus_plugins.plugins import resolve

from .model_source import check_model, model_name, resolve_model_source


def meta_model(path_or_id: str | os.PathLike[str] | None, dtype: Any = None) -> tuple[torch.nn.Module, str]:
    """Build the model on the `meta` device from its config alone (no weights read or allocated).

    Returns the model and the name shown in reports. `dtype`: override the checkpoint's dtype.
    """
    from transformers import AutoModelForCausalLM

    source, extra = resolve_model_source(path_or_id)
    cfg = check_model(source, extra, model_name(path_or_id), weights=False)  # planning reads no weights
    dtype = dtype or getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, (str(path_or_id) if path_or_id else "SmolLM2-135M-Instruct (embedded default)")


def _loads_lean(path_or_id: str | os.PathLike[str] | None) -> bool:
    """Whether `TorusModel.from_pretrained` would load this model lean (a safetensors directory;
    a conversion the lean loader refuses is only found when loading: then the peak is higher)."""
    from .lean_load import NotLean, _shards

    source, extra = resolve_model_source(path_or_id)
    try:
        return not extra and bool(_shards(Path(source)))
    except (NotLean, OSError):
        return False


def plan_model(
    path_or_id: str | os.PathLike[str] | None,
    config: TorusConfig,
    bandwidth: float | str | None = None,
    device: str | None = None,
    dtype: Any = None,
    host: bool = True,
    disk_bandwidth: float | str | None = None,
) -> DeploymentPlan:
    """Plan how `config` would run the model. `bandwidth`: bytes/s or "25GB/s"; None probes it.
    `disk_bandwidth`: the disk's read speed, for the disk-bound speed under a `host_budget`.
    `host`: also probe this machine's host and forecast the host placement (streaming-only,
    host-only and hybrid predictions, the split host_compute="auto" would use)."""
    model, name = meta_model(path_or_id, dtype)
    arch = next((a for a in resolve().architectures if a.matches(model)), None)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"no architecture plugin knows {type(model).__name__}; see torus_register_architectures"
        )
    dev = resolve_device(device or config.device)
    bps = parse_bandwidth(bandwidth) if bandwidth is not None else probe_bandwidth(dev)
    budget = config.budget_bytes
    if budget is None and dev.type == "cuda":
        budget = int(torch.cuda.mem_get_info(dev)[0] * 0.9)
        config = config.replace(vram_budget=budget)
    # MoE: routed experts stream through their own cache, as at attach (not as FFN layers).
    expert_sites = list(arch.expert_sites(model)) if hasattr(arch, "expert_sites") else []
    sizes = measure(model, arch, config.weight_quant, config.quant_group_size, expert_param_ids(expert_sites))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lean = _loads_lean(path_or_id)
    disk = parse_bandwidth(disk_bandwidth) if disk_bandwidth is not None else None
    plan = make_plan(sizes, config, bps, model=name, device=str(dev), model_bytes=total, lean=lean, disk_bps=disk)
    if expert_sites:
        plan = with_experts(plan, expert_sites, lean)
    plan.extra.update(
        architecture=arch.name, dtype=str(next(model.parameters()).dtype), bandwidth_probed=bandwidth is None
    )
    if host and plan.residency is not None and plan.residency.streamed and sizes.sites:
        plan = dataclasses.replace(plan, host=host_forecast(model, sizes, config, bps, plan.residency.streamed))
    return plan


def host_forecast(model: Any, sizes: Any, config: TorusConfig, bps: float, streamed: tuple[int, ...]) -> HostForecast:
    """Probe this machine's host (memory read bandwidth, FFN throughput for the model's FFN shapes,
    dtype and weight format) and forecast the hybrid split, as the engine's host_compute="auto" would."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = [getattr(owner, attr) for _, owner, attr in sizes.sites[streamed[0]].params]
    hidden = int(getattr(cfg, "hidden_size", 0) or params[0].shape[-1])
    inter = next((d for p in params if p.dim() == 2 for d in p.shape if d != hidden), hidden)
    quant, group = config.weight_quant, config.quant_group_size
    probe = probe_host(hidden, inter, params[0].dtype, quant, group)
    kernel, act = choose_kernel(config, probe, params[0].dtype)
    costs = HostCosts(bps, probe.ffn_bps, probe.ffn_bps_at, probe.probe_tokens, probe.memory_bps)
    act_name = None if act is None else str(act).removeprefix("torch.")
    return forecast(
        costs,
        [sizes.transfer_bytes[i] for i in streamed],
        inter,
        split_align(quant, group),
        kernel,
        act_name,
        config.host_share,
    )
