"""`TorusSparseModel`: `TorusModel` under the seed project's name, configured by `TorusSparseConfig`."""

from __future__ import annotations

import os
from typing import Any

from torus_adapters.transformers_adapter.torus_model import TorusModel, resolve_model_source
from torus_plugins import TorusConfig

from .config import TorusSparseConfig


def _num_layers(path_or_id: str | os.PathLike[str] | None) -> int | None:
    from transformers import AutoConfig

    source, extra = resolve_model_source(path_or_id)
    n = getattr(AutoConfig.from_pretrained(source, **extra), "num_hidden_layers", None)
    return n if isinstance(n, int) else None


class TorusSparseModel(TorusModel):
    """`TorusModel` (generate → str, stream_generate → pieces, stats, the plain `model`) whose
    `from_pretrained` also takes the seed's `TorusSparseConfig`."""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_id: str | os.PathLike[str] | None = None,
        config: TorusSparseConfig | TorusConfig | None = None,
        **kwargs: Any,
    ) -> "TorusSparseModel":
        """Load a model (default: the embedded SmolLM2-135M-Instruct) and attach an engine.

        config: a `TorusSparseConfig` (mapped onto `TorusConfig`) or a `TorusConfig`.
        kwargs: as `TorusModel.from_pretrained` (dtype, show_progress, transformers' own).
        """
        if isinstance(config, TorusSparseConfig):
            layers = _num_layers(path_or_id) if config.vram_resident_fraction is not None else None
            config = config.to_torus_config(layers)
        tm = TorusModel.from_pretrained(path_or_id, config, **kwargs)
        return cls(tm.model, tm.tokenizer)
