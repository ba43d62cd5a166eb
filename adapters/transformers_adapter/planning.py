"""`torus-sparse plan` for transformers models: read config and shapes, never the weights."""

from __future__ import annotations

import os
from typing import Any

import torch

from torus_plugins import TorusConfig, UnsupportedArchitectureError
from torus_plugins.bandwidth import probe_bandwidth
from torus_plugins.config import parse_bandwidth
from torus_plugins.engine import resolve_device
from torus_plugins.planning.deployment import DeploymentPlan, make_plan
from torus_plugins.planning.sizes import measure
from torus_plugins.plugins import resolve

from .torus_model import resolve_model_source


def meta_model(path_or_id: str | os.PathLike[str] | None, dtype: Any = None) -> tuple[torch.nn.Module, str]:
    """Build the model on the `meta` device from its config alone (no weights read or allocated).

    Returns the model and the name shown in reports. `dtype`: override the checkpoint's dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source, extra = resolve_model_source(path_or_id)
    cfg = AutoConfig.from_pretrained(source, **extra)
    dtype = dtype or getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, (str(path_or_id) if path_or_id else "SmolLM2-135M-Instruct (embedded default)")


def plan_model(
    path_or_id: str | os.PathLike[str] | None,
    config: TorusConfig,
    bandwidth: float | str | None = None,
    device: str | None = None,
    dtype: Any = None,
) -> DeploymentPlan:
    """Plan how `config` would run the model. `bandwidth`: bytes/s or "25GB/s"; None probes it."""
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
    sizes = measure(model, arch, config.weight_quant, config.quant_group_size)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = make_plan(sizes, config, bps, model=name, device=str(dev), model_bytes=total)
    plan.extra.update(
        architecture=arch.name, dtype=str(next(model.parameters()).dtype), bandwidth_probed=bandwidth is None
    )
    return plan
