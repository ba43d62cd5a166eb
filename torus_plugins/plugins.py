"""The plugin manager: loads plugins from entry points and resolves what they register.

Built-in plugins are listed in this project's own `torus_sparse` entry points, exactly like a
third party's. `TORUS_SPARSE_DISABLE_PLUGIN_AUTOLOAD=1` keeps only those built-ins. A third-party
plugin that fails to import is logged and skipped, never fatal.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    from .architecture import Architecture
    from .moe.predict import ExpertPredictorFactory
    from .prefetch import PrefetchFactory
    from .stats import StatsEvent
    from .transfer import TransportFactory

log = logging.getLogger(__name__)

DISTRIBUTION = "torus-sparse"
AUTOLOAD_ENV = "TORUS_SPARSE_DISABLE_PLUGIN_AUTOLOAD"
_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_builtin(ep: md.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.metadata["Name"] == DISTRIBUTION


def build_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """A fresh manager with the built-ins and (unless disabled) every installed plugin.

    autoload: load third-party entry points; `None` reads `TORUS_SPARSE_DISABLE_PLUGIN_AUTOLOAD`.
    """
    if autoload is None:
        autoload = not _autoload_disabled()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    # Built-ins first: pluggy calls later registrations first, so a third party's architecture
    # for a model family wins over the built-in one.
    eps = sorted(md.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda ep: not _is_builtin(ep))
    for ep in eps:
        builtin = _is_builtin(ep)
        if not builtin and not autoload:
            continue
        name = ep.name if builtin else f"{ep.dist.metadata['Name'] if ep.dist else '?'}:{ep.name}"
        if pm.has_plugin(name):
            continue  # the same distribution visible twice on sys.path
        try:
            plugin = ep.load()
        except Exception as exc:
            if builtin:
                raise
            log.warning("torus-sparse plugin %r (%s) failed to load and is skipped: %s", name, ep.value, exc)
            continue
        pm.register(plugin, name=name)
    if not any(_is_builtin(ep) for ep in eps):
        # The built-ins are entry points of this distribution: without them the tree was imported
        # from a source checkout that was never installed, and nothing would be registered.
        raise PluginError(
            "torus-sparse's built-in plugins are not registered (no 'torus_sparse' entry points of the "
            "torus-sparse distribution): install the project, e.g. `pip install -e .`, instead of running "
            "it from a bare source tree"
        )
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = build_plugin_manager()
        return _manager


@dataclass
class Registry:
    """What the plugins registered, resolved into plain objects (done once per attach)."""

    architectures: list["Architecture"] = field(default_factory=list)
    transports: dict[str, "TransportFactory"] = field(default_factory=dict)
    prefetch_policies: dict[str, "PrefetchFactory"] = field(default_factory=dict)
    expert_predictors: dict[str, "ExpertPredictorFactory"] = field(default_factory=dict)
    _pm: pluggy.PluginManager | None = None

    def lookup(self, kind: str, name: str) -> Any:
        """The factory registered as `name` for `kind` ("transport", "prefetch", "moe_predictor"),
        or a `ConfigError` listing what is registered and the hook that adds more."""
        table, hook = {
            "transport": (self.transports, "torus_register_transports"),
            "prefetch": (self.prefetch_policies, "torus_register_prefetch_policies"),
            "moe_predictor": (self.expert_predictors, "torus_register_expert_predictors"),
        }[kind]
        factory = table.get(name)
        if factory is None:
            raise ConfigError(
                f"unknown {kind} {name!r}; available: {', '.join(sorted(table))} "
                f"(plugins add more through the {hook} hook)"
            )
        return factory

    def emit(self, event: "StatsEvent") -> None:
        """Call every `torus_stats_event` observer; one that raises is logged, not propagated."""
        if self._pm is None:
            return
        for impl in self._pm.hook.torus_stats_event.get_hookimpls():
            try:
                impl.function(event=event)
            except Exception:
                log.exception("torus_stats_event observer %r failed; ignoring it", impl.plugin_name)


def _named_register(kind: str, into: dict[str, Any]):
    kind = ("an " if kind[0] in "aeiou" else "a ") + kind

    def register(name: str, factory: Any) -> None:
        if not isinstance(name, str) or not callable(factory):
            raise PluginError(f"register {kind} as register(name: str, factory: callable), got ({name!r}, {factory!r})")
        if name in into:
            raise PluginError(f"two plugins register {kind} named {name!r}; rename one of them")
        into[name] = factory

    return register


def resolve(pm: pluggy.PluginManager | None = None) -> Registry:
    """Ask every plugin to register its contributions and return them as a `Registry`."""
    pm = pm or get_plugin_manager()
    reg = Registry(_pm=pm)

    def register_arch(arch: "Architecture") -> None:
        for attr in ("name", "matches", "ffn_sites", "kv_bytes_per_token"):
            if not hasattr(arch, attr):
                raise PluginError(f"architecture {arch!r} lacks {attr!r}; see torus_plugins.architecture.Architecture")
        reg.architectures.append(arch)

    pm.hook.torus_register_architectures(register=register_arch)
    pm.hook.torus_register_transports(register=_named_register("transport", reg.transports))
    pm.hook.torus_register_prefetch_policies(register=_named_register("prefetch policy", reg.prefetch_policies))
    pm.hook.torus_register_expert_predictors(register=_named_register("expert predictor", reg.expert_predictors))
    return reg
