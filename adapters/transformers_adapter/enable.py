"""`enable()` / `disable()` / `enabled()`: while on, every transformers `from_pretrained` (so
`pipeline("text-generation")` too) returns a model with its FFN weights streamed."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import weakref
from typing import Any, Iterator

from torus_plugins import TorusConfig, TorusError, UnsupportedArchitectureError
from torus_plugins.lifecycle import attach, is_attached

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- enable() / pipeline()
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("torus_bypass", default=False)
_enabled_stack: list[tuple[TorusConfig, bool]] = []  # (config, allow_unstreamed)
_original_from_pretrained: Any = None
_attached_by_enable: weakref.WeakSet[Any] = weakref.WeakSet()


def attached_models() -> list[Any]:
    """Models that `enable()` attached an engine to and that are still alive and attached."""
    return [m for m in list(_attached_by_enable) if is_attached(m)]


def _patched_from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
    if _BYPASS.get() or not _enabled_stack:
        return _original_from_pretrained.__func__(cls, *args, **kwargs)
    if kwargs.pop("device_map", None) is not None:
        log.warning("torus-sparse is enabled and places weights itself; ignoring device_map")
    model = _original_from_pretrained.__func__(cls, *args, **kwargs)
    config, allow_unstreamed = _enabled_stack[-1]
    if is_attached(model):
        return model
    try:
        attach(model, config)
    except UnsupportedArchitectureError as exc:
        if allow_unstreamed:
            # The caller opted in: a model no plugin can stream loads as usual, with no budget applied.
            log.warning(
                "torus-sparse: %s; loaded WITHOUT streaming (allow_unstreamed=True), so vram_budget does not apply to it",
                exc,
            )
            return model
        raise UnsupportedArchitectureError(
            f"{exc} Or, to load such models without streaming while enabled (the budget will not apply), "
            f"pass allow_unstreamed=True to torus_plugins.enable()/enabled()."
        ) from None
    _attached_by_enable.add(model)
    return model


def enable(config: TorusConfig | None = None, *, allow_unstreamed: bool = False, **overrides: Any) -> None:
    """From now on, every transformers `from_pretrained` (so `pipeline()` too) returns a model
    with FFN weights streamed under `config`. Undo with `disable()`; calls nest.

    A model no architecture plugin knows raises `UnsupportedArchitectureError` from
    `from_pretrained`, as `attach` would; with `allow_unstreamed=True` it loads unstreamed instead
    (with a warning: the budget does not apply to it).
    """
    global _original_from_pretrained
    from transformers import PreTrainedModel

    cfg = (config or TorusConfig()).replace(**overrides) if overrides else (config or TorusConfig())
    if _original_from_pretrained is None:
        _original_from_pretrained = PreTrainedModel.__dict__["from_pretrained"]
        PreTrainedModel.from_pretrained = classmethod(_patched_from_pretrained)
    _enabled_stack.append((cfg, bool(allow_unstreamed)))


def disable() -> None:
    """Undo the latest `enable()`; after the last one, `from_pretrained` is untouched again.

    Models already loaded keep their engines (remove one with `torus_plugins.detach(model)`).
    """
    global _original_from_pretrained
    from transformers import PreTrainedModel

    if not _enabled_stack:
        raise TorusError("torus_plugins.disable() called but the plugin is not enabled")
    _enabled_stack.pop()
    if not _enabled_stack and _original_from_pretrained is not None:
        PreTrainedModel.from_pretrained = _original_from_pretrained
        _original_from_pretrained = None


@contextlib.contextmanager
def enabled(
    config: TorusConfig | None = None, *, allow_unstreamed: bool = False, **overrides: Any
) -> Iterator[TorusConfig]:
    """`with torus_plugins.enabled(vram_budget="2GB"): pipe = pipeline(...)`: enable for the block."""
    enable(config, allow_unstreamed=allow_unstreamed, **overrides)
    try:
        yield _enabled_stack[-1][0]
    finally:
        disable()
