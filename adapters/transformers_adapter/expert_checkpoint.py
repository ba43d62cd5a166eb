"""Read one routed expert straight from a checkpoint on disk, without loading anything else.

`transformers` 5 fuses experts into `[E, ...]` tensors when it loads a model, but checkpoints keep
them apart (`model.layers.3.mlp.experts.17.gate_proj.weight`, Mixtral's `block_sparse_moe...w1`),
so one expert is a few small reads through safetensors' memory map. GPT-OSS checkpoints store
experts fused; there a slice `[e]` of the fused tensor is read, still touching only that expert's
bytes. Tensors come back in the fused layout the engine packs (`gate_up_proj` = gate rows then
up rows), so `read(layer, e)` equals `experts.<param>[e]` of the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from torus_plugins.errors import ModelNotFoundError

#: (gate, up, down) file names of per-expert checkpoints, by naming family.
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_BLOCKS = ("mlp", "block_sparse_moe")


class CheckpointExperts:
    """Index of a safetensors checkpoint directory; `read(layer, expert)` loads one expert."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.directory / "model.safetensors"
            if not single.is_file():
                raise ModelNotFoundError(f"{self.directory} has no model.safetensors(.index.json)")
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        self._where: dict[str, str] = weight_map

    def _get(self, key: str, expert: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.directory / self._where[key], "pt") as f:
            if expert is None:
                return f.get_tensor(key)
            return f.get_slice(key)[expert]

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert` of decoder layer `layer`, keyed by the fused parameter names."""
        for block in _BLOCKS:
            prefix = f"model.layers.{layer}.{block}.experts."
            for gate, up, down in _PER_EXPERT_NAMES:
                g = f"{prefix}{expert}.{gate}.weight"
                if g in self._where:
                    u, d = f"{prefix}{expert}.{up}.weight", f"{prefix}{expert}.{down}.weight"
                    return {
                        "gate_up_proj": torch.cat([self._get(g), self._get(u)], dim=0),
                        "down_proj": self._get(d),
                    }
            fused = sorted(
                k[len(prefix) :] for k in self._where if k.startswith(prefix) and "." not in k[len(prefix) :]
            )
            if fused:
                return {name: self._get(prefix + name, expert) for name in fused}
        raise KeyError(f"no experts of layer {layer} in {self.directory} (a dense layer, or an unknown naming)")
