"""Load a safetensors checkpoint without its FFN weights: they are read one tensor at a time at attach.

`from_pretrained` materializes the whole model before attach sees it: dense FFN weights stay
mapped from the file, but a MoE's per-expert tensors go through transformers' `MergeModulelist`
into anonymous fused `[E, 2I, H]` tensors -- the full bf16 expert set in RAM before anything is
quantized (a 61 GB Qwen3-30B-A3B cannot load in int4 on 32 GB). `load_lean` instead builds the
model with its FFN and routed-expert parameters on the `meta` device, loads every other tensor
from the checkpoint, and hands attach a `CheckpointWeights` source that reads each FFN tensor --
or one routed expert of a fused parameter -- straight from the file when attach packs it.

Every tensor is cast to the dtype the skeleton gives its parameter (transformers' own choice,
fp32-kept modules included). The checkpoint keys are mapped to the model's parameters by transformers' own renaming and
conversion rules (`conversion_mapping`), so the lean model is the model `from_pretrained` builds.
Where that cannot be proven here (GGUF, `.bin`, a conversion other than stacking experts and
concatenating gate with up, a missing tensor), `load_lean` returns the
reason and the caller loads through `from_pretrained` as before.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torus_plugins.os_memory import release_pages
from torus_plugins.plugins import resolve
from torus_plugins.weight_source import SOURCE_ATTR

log = logging.getLogger(__name__)

#: `from_pretrained` keywords the lean loader honours (anything else: load through transformers).
LEAN_KWARGS = ("attn_implementation", "local_files_only", "cache_dir", "revision", "token")


class NotLean(Exception):
    """Why this checkpoint loads through `from_pretrained` instead (one sentence)."""


@dataclass
class _Fused:
    """A fused experts parameter: per source pattern, each expert's checkpoint key."""

    keys: list[dict[int, str]]
    concat: bool  # gate and up concatenated along the expert's dim 0 (MergeModulelist + Concatenate(1))


@dataclass
class CheckpointWeights:
    """A `WeightSource` over a safetensors checkpoint (one open handle per shard)."""

    dtypes: dict[str, torch.dtype]
    direct: dict[str, str] = field(default_factory=dict)  # parameter -> checkpoint key
    fused: dict[str, _Fused] = field(default_factory=dict)
    shard_of: dict[str, str] = field(default_factory=dict)  # checkpoint key -> shard file
    _handles: dict[str, Any] = field(default_factory=dict)

    def provides(self, name: str) -> bool:
        return name in self.direct or name in self.fused

    def _handle(self, key: str) -> Any:
        from safetensors import safe_open

        shard = self.shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard, framework="pt")
        return self._handles[shard]

    def tensor(self, key: str, index: int | None = None) -> torch.Tensor:
        """Checkpoint tensor `key` (or its `index`-th slice along dim 0), mapped from the file."""
        if index is None:
            return self._handle(key).get_tensor(key)
        return self._handle(key).get_slice(key)[index]  # one expert's bytes, not the fused tensor's

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        dtype = self.dtypes[name]
        if name in self.direct:
            return _owned(self.tensor(self.direct[name], index), dtype)
        fused = self.fused[name]
        experts = range(len(fused.keys[0])) if index is None else [index]
        parts = []
        for e in experts:
            pieces = [_owned(self.tensor(keys[e]), dtype, copy=True) for keys in fused.keys]
            parts.append(torch.cat(pieces, dim=0) if fused.concat else pieces[0])
        return parts[0] if index is not None else torch.stack(parts)


def _owned(t: torch.Tensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
    """`t` in `dtype`; when that (or `copy`) makes a new tensor, the mapped checkpoint pages `t` was
    read from are handed back at once (the caller releases only what it is given: os_memory)."""
    out = t.to(dtype, copy=copy)
    if out.data_ptr() != t.data_ptr():
        release_pages(t)
    return out


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise NotLean("the checkpoint is not in safetensors format (model.safetensors[.index.json])")


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None:
            return torch.float32
        return found if isinstance(found, torch.dtype) else getattr(torch, str(found))
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise NotLean(f"dtype {dtype!r} is not one the lean loader reads")


def _converter_rule(converter: Any) -> bool:
    """Whether `converter` only stacks per-expert tensors (and concatenates gate with up)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    if len(ops) == 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
        return len(converter.source_patterns) == 1
    return (
        len(ops) == 2
        and isinstance(ops[0], MergeModulelist)
        and ops[0].dim == 0
        and isinstance(ops[1], Concatenate)
        and ops[1].dim == 1
        and len(converter.source_patterns) == 2
    )


def _expert_index(pattern: str, key: str) -> int:
    """The `*` of a converter's source pattern (`mlp.experts.*.gate_proj.weight`) in `key`."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, key)
    if found is None:
        raise NotLean(f"checkpoint key {key!r} does not name an expert as {pattern!r} does")
    return int(found.group(1))


def _ffn_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters an engine streams (FFN layers and routed experts)."""
    arch = next((a for a in resolve(None).architectures if a.matches(model)), None)
    if arch is None:
        raise NotLean(f"no torus-sparse architecture knows {type(model).__name__}")
    ids = {id(getattr(owner, attr)) for site in arch.ffn_sites(model) for _, owner, attr in site.params}
    if hasattr(arch, "expert_sites"):
        ids |= {id(getattr(site.module, attr)) for site in arch.expert_sites(model) for _, attr in site.params}
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    # A shared or tied FFN parameter stays with the non-FFN weights (see planning.sizes): load it.
    return {n for n, p in model.named_parameters() if id(p) in ids and counts[id(p)] == 1}


def _skeleton(directory: Path, dtype: Any, hf_kwargs: dict[str, Any]) -> nn.Module:
    """The model with every parameter on `meta` and its buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = {k: v for k, v in hf_kwargs.items() if k in ("local_files_only", "cache_dir", "revision", "token")}
    config = AutoConfig.from_pretrained(str(directory), **config_kwargs)
    if getattr(config, "quantization_config", None) is not None:
        raise NotLean("the checkpoint is pre-quantized (quantization_config)")
    resolved = _resolve_dtype(dtype, config)
    extra = {"attn_implementation": hf_kwargs["attn_implementation"]} if "attn_implementation" in hf_kwargs else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved, **extra)
    return model


def _map_keys(model: nn.Module, shards: list[Path], ffn: set[str]) -> tuple[CheckpointWeights, dict[str, str]]:
    """Every checkpoint key mapped to the model's parameter or buffer, as transformers maps it."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    weights = CheckpointWeights(dtypes)
    non_ffn: dict[str, str] = {}
    fused_rules: dict[str, Any] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            weights.shard_of[key] = str(shard)
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
            if pattern is None:
                if target not in meta_sd:
                    continue  # an unexpected key: transformers ignores it too (with a warning)
                (weights.direct if target in ffn else non_ffn)[target] = key
                continue
            if target not in meta_sd:
                continue  # converted into nothing this model has: unexpected, as for transformers
            converter = next(c for c in converters if pattern in c.source_patterns)
            if target not in ffn or not _converter_rule(converter):
                raise NotLean(f"checkpoint key {key!r} needs transformers' conversion {type(converter).__name__}")
            fused = weights.fused.setdefault(
                target, _Fused([{} for _ in converter.source_patterns], len(converter.source_patterns) == 2)
            )
            fused_rules[target] = converter
            fused.keys[converter.source_patterns.index(pattern)][_expert_index(pattern, key)] = key
    for target, fused in weights.fused.items():
        experts = meta_sd[target].shape[0]
        if any(sorted(k) != list(range(experts)) for k in fused.keys):
            raise NotLean(f"the checkpoint does not hold every expert of {target} ({experts} expected)")
    return weights, non_ffn


def load_lean(directory: str | Path, dtype: Any = "auto", **hf_kwargs: Any) -> nn.Module:
    """The model of the safetensors checkpoint in `directory`, its FFN and routed-expert parameters
    left empty (`meta`) with a `CheckpointWeights` source attached for `attach` to read them from.

    Raises `NotLean` (with why) when it cannot prove the result equals `from_pretrained`'s.
    """
    from transformers import GenerationConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise NotLean(f"{directory} is not a local checkpoint directory")
    unknown = sorted(set(hf_kwargs) - set(LEAN_KWARGS))
    if unknown:
        raise NotLean(f"from_pretrained options {', '.join(unknown)} are left to transformers")
    shards = _shards(directory)
    model = _skeleton(directory, dtype, hf_kwargs)
    ffn = _ffn_names(model)
    weights, non_ffn = _map_keys(model, shards, ffn)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    persistent = set(model.state_dict())
    missing = sorted(persistent - set(non_ffn) - ffn - tied)
    if missing:
        raise NotLean(f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing)")
    unread = sorted(ffn - set(weights.direct) - set(weights.fused))
    if unread:
        raise NotLean(f"the checkpoint has no tensor for FFN parameter {unread[0]}")
    # Everything but the FFN weights: read now, in the model's dtype, as from_pretrained would.
    for target, key in non_ffn.items():
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        t = weights.tensor(key)
        if attr in owner._parameters:
            p = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(
                t.to(p.dtype) if t.is_floating_point() else t, requires_grad=p.requires_grad
            )
        else:
            b = owner._buffers[attr]
            owner._buffers[attr] = t.to(b.dtype) if t.is_floating_point() else t
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta and n not in ffn]
    if empty:
        raise NotLean(f"{empty[0]} stays empty after loading")
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except OSError:
        pass  # no generation_config.json: from_pretrained keeps the one built from the config too
    model.config._name_or_path = str(directory)
    model.__dict__[SOURCE_ATTR] = weights
    return model.eval()
