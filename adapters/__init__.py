"""Adapters between the torus-sparse core and the frameworks users already run (installed as
`torus_adapters`). One folder per kind of thing:

- `transformers_adapter/`: the transformers adapter (`TorusModel`, `enable()`, the architecture
  and MoE tables, the embedded default model, planning on a config-only model, `transformers serve`).
- `server/`: `torus-sparse serve`, the OpenAI- and TGI-compatible HTTP server.
- `apps/`: what a user launches: the console command, the terminal chat, the Gradio demo.
- `tools/`: what a developer runs: the benchmark, MoEfication, routing traces and predictor training.

Imports point one way: apps → tools → transformers_adapter / server → the core (`torus_plugins`).
The names README examples need are importable from here directly (loaded on first use, so a
plugin load that imports one table does not import the rest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .transformers_adapter import TorusModel, disable, enable, enabled
    from .transformers_adapter.architectures import DecoderFFN
    from .transformers_adapter.default_model import default_model_path
    from .transformers_adapter.moe_architectures import MoEDecoder
    from .transformers_adapter.planning import plan_model

_LAZY = {
    "TorusModel": "transformers_adapter",
    "enable": "transformers_adapter",
    "disable": "transformers_adapter",
    "enabled": "transformers_adapter",
    "DecoderFFN": "transformers_adapter.architectures",
    "MoEDecoder": "transformers_adapter.moe_architectures",
    "default_model_path": "transformers_adapter.default_model",
    "plan_model": "transformers_adapter.planning",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torus_adapters' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DecoderFFN",
    "MoEDecoder",
    "TorusModel",
    "default_model_path",
    "disable",
    "enable",
    "enabled",
    "plan_model",
]
assert sorted(__all__) == sorted(_LAZY)
