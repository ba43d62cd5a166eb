"""torus-sparse: run language models whose FFN weights do not fit on the GPU.

FFN weights live in host memory and stream to the device just before each layer needs them,
overlapped with compute; attention, embeddings and norms stay resident.

The core (this package) imports torch and pluggy only. The names that need `transformers`
(`TorusModel`, `enable`, `disable`, `enabled`) load the transformers adapter on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .architecture import Architecture, FFNSite
from .config import TorusConfig, parse_bytes
from .engine import Engine
from .errors import (
    AlreadyAttachedError,
    BudgetTooSmallError,
    ConfigError,
    IncompatibleModelError,
    ModelNotFoundError,
    NotAttachedError,
    PluginError,
    TorusError,
    TransferError,
    UnsupportedArchitectureError,
)
from .hookspecs import hookimpl
from .lifecycle import attach, detach, get_engine, is_attached
from .stats import EngineStats, LayerStats, StatsEvent

if TYPE_CHECKING:
    from torus_adapters.transformers_adapter import TorusModel, disable, enable, enabled

__version__ = "0.1.0"

_ADAPTER_NAMES = {"TorusModel", "enable", "disable", "enabled"}


def __getattr__(name: str) -> Any:
    # Lazy, so `import torus_plugins` never imports transformers.
    if name in _ADAPTER_NAMES:
        from torus_adapters import transformers_adapter

        return getattr(transformers_adapter, name)
    raise AttributeError(f"module 'torus_plugins' has no attribute {name!r}")


__all__ = [
    "AlreadyAttachedError",
    "Architecture",
    "BudgetTooSmallError",
    "ConfigError",
    "Engine",
    "EngineStats",
    "FFNSite",
    "IncompatibleModelError",
    "LayerStats",
    "ModelNotFoundError",
    "NotAttachedError",
    "PluginError",
    "StatsEvent",
    "TorusConfig",
    "TorusError",
    "TorusModel",
    "TransferError",
    "UnsupportedArchitectureError",
    "attach",
    "detach",
    "disable",
    "enable",
    "enabled",
    "get_engine",
    "hookimpl",
    "is_attached",
    "parse_bytes",
    "__version__",
]
