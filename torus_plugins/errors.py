"""Every error the engine raises on purpose: one base class, so callers can catch them together."""

from __future__ import annotations


class TorusError(Exception):
    """Base class of torus-sparse errors."""


class ConfigError(TorusError, ValueError):
    """A configuration value is malformed or out of range."""


class BudgetTooSmallError(TorusError, ValueError):
    """The device budget cannot hold what streaming needs; the message names the minimum."""

    def __init__(self, message: str, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class UnsupportedArchitectureError(TorusError, ValueError):
    """No registered architecture plugin knows where this model keeps its FFN weights."""


class AlreadyAttachedError(TorusError, RuntimeError):
    """`attach` was called on a model that already has an engine."""


class NotAttachedError(TorusError, RuntimeError):
    """`detach` (or an engine query) was called on a model that has no engine."""


class TransferError(TorusError, RuntimeError):
    """A host→device transfer failed or did not finish in time."""


class ModelNotFoundError(TorusError, FileNotFoundError):
    """A model path or id could not be found."""


class PluginError(TorusError, RuntimeError):
    """A plugin registered something malformed or conflicting."""


class IncompatibleModelError(TorusError, ValueError):
    """The model is in a state the engine cannot stream from: hooked by accelerate, weights on the
    meta device, or being compiled / captured into a CUDA graph."""
