"""`attach` / `detach`: put an engine on a loaded model and take it off again, exactly.

Framework-agnostic: any `torch.nn.Module` that a registered architecture recognises works.
"""

from __future__ import annotations

from typing import Callable

import pluggy
from torch import nn

from .config import TorusConfig
from .engine import Engine
from .errors import AlreadyAttachedError, NotAttachedError, UnsupportedArchitectureError
from .guards import check_not_hooked
from .plugins import resolve
from .weight_source import WeightSource, source_of

_ATTR = "_torus_engine"


def get_engine(model: nn.Module) -> Engine:
    """The engine attached to `model`; raises `NotAttachedError` if there is none."""
    engine = model.__dict__.get(_ATTR)
    if engine is None:
        raise NotAttachedError(
            f"{type(model).__name__} has no torus-sparse engine attached; call torus_plugins.attach(model) first"
        )
    return engine


def is_attached(model: nn.Module) -> bool:
    return model.__dict__.get(_ATTR) is not None


def attach(
    model: nn.Module,
    config: TorusConfig | None = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: WeightSource | None = None,
    **overrides: object,
) -> Engine:
    """Stream `model`'s FFN weights from host memory; everything else moves to the compute device.

    config: a `TorusConfig`; keyword overrides (e.g. ``lookahead=3``) are applied on top.
    plugin_manager: use this manager instead of the process-wide one.
    progress: ``progress(done, total)`` after each FFN layer is packed.
    weights: where FFN parameters left on the meta device are read from, one tensor at a time
        (default: the source a loader left on the model, see `weight_source`); each is read just
        before it is packed, so the full-precision FFN weights never sit in host memory at once.

    Errors leave the model unchanged: `AlreadyAttachedError`, `UnsupportedArchitectureError`,
    `ConfigError`, `BudgetTooSmallError`, `IncompatibleModelError` (accelerate hooks or weights on
    the meta device: load the model without `device_map`).
    """
    if is_attached(model):
        raise AlreadyAttachedError(
            f"{type(model).__name__} already has a torus-sparse engine; call torus_plugins.detach(model) first"
        )
    weights = source_of(model, weights)
    check_not_hooked(model, weights)
    config = (config or TorusConfig()).replace(**overrides) if overrides else (config or TorusConfig())
    registry = resolve(plugin_manager)
    arch = next((a for a in registry.architectures if a.matches(model)), None)
    if arch is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        names = ", ".join(sorted({a.name for a in registry.architectures})) or "none"
        raise UnsupportedArchitectureError(
            f"no torus-sparse architecture plugin knows {type(model).__name__}"
            + (f" (model_type {kind!r})" if kind else "")
            + f". Supported: {names}. Add one by implementing the torus_register_architectures hook "
            f"(see torus_plugins.hookspecs and docs/plugins.md, 'Adding an architecture')."
        )
    engine = Engine(model, arch, config, registry, weights)
    engine.build(progress)
    model.__dict__[_ATTR] = engine
    engine.publish("attached")
    return engine


def detach(model: nn.Module) -> nn.Module:
    """Undo `attach`: parameters back where they were, hooks gone, outputs equal to before.

    With `weight_quant`, the originals were not kept (that is the memory it saves): the
    parameters come back holding the dequantized weights the engine computed with, so outputs
    equal those of the attached model. Reload the checkpoint for the unquantized weights.
    """
    engine = get_engine(model)
    engine.publish("detached")
    engine.teardown()
    del model.__dict__[_ATTR]
    return model
