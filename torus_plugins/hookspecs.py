"""Every hook a torus-sparse plugin can implement. This module is the plugin API's documentation.

A plugin is any module or object with functions decorated by `hookimpl`, made known through the
`torus_sparse` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.torus_sparse]
    my_arch = "my_package.torus_plugin"

Registration hooks hand the plugin a `register(...)` callback, so the core decides how
contributions combine (and names the plugin when two register the same name). All of them are
called once, when a model is attached; what they register is resolved into plain objects then, so
no pluggy call happens per token. Only `torus_stats_event` is called later, at coarse moments
(attach, end of a generation, detach), never per layer.

Set `TORUS_SPARSE_DISABLE_PLUGIN_AUTOLOAD=1` to load only the built-in plugins. Every type a
plugin implements or receives is importable from `torus_plugins.plugin_api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # keep this module free to import
    from .architecture import Architecture
    from .moe.predict import ExpertPredictorFactory
    from .prefetch import PrefetchFactory
    from .stats import StatsEvent
    from .transfer import TransportFactory

PROJECT = "torus_sparse"
#: The entry-point group plugins (built-in ones included) are registered under.
ENTRY_POINT_GROUP = "torus_sparse"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def torus_register_architectures(register: Callable[["Architecture"], None]) -> None:
    """Register architectures: objects that locate the streamable FFN weights of a model family.

    Call ``register(arch)`` once per family. ``arch`` follows
    `torus_plugins.architecture.Architecture`: ``name``, ``matches(model)``,
    ``ffn_sites(model)`` and ``kv_bytes_per_token(model)``. The first architecture whose
    ``matches`` is true is used; third-party plugins are asked before the built-in ones, so a
    plugin can take over a family the built-ins already know. Called once per attach.
    """


@hookspec
def torus_register_prefetch_policies(register: Callable[[str, "PrefetchFactory"], None]) -> None:
    """Register prefetch policies under a name (selected with ``TorusConfig.prefetch``).

    Call ``register(name, factory)``; ``factory(ctx: PrefetchContext)`` returns an object with
    ``warmup()`` and ``after(layer)`` (see `torus_plugins.prefetch.PrefetchPolicy`). Called once
    per attach; the policy it builds runs on the hot path: precompute what you can in the factory.
    """


@hookspec
def torus_register_expert_predictors(register: Callable[[str, "ExpertPredictorFactory"], None]) -> None:
    """Register MoE expert predictors under a name (selected with ``TorusConfig.moe_predictor``).

    Call ``register(name, factory)``; ``factory(ctx: ExpertPredictContext)`` returns an object
    with ``predict(j, hidden, routed)`` naming experts to prefetch for the MoE layers after ``j``
    (see `torus_plugins.moe.predict.ExpertPredictor`), or None to predict nothing. Built in: ``speculative``, ``learned``,
    ``frequency``, ``none``. Called once per attach; ``predict`` runs once per MoE layer per
    forward pass, so precompute in the factory.
    """


@hookspec
def torus_register_transports(register: Callable[[str, "TransportFactory"], None]) -> None:
    """Register transfer backends under a name (selected with ``TorusConfig.transport``).

    Call ``register(name, factory)``; ``factory(opts: TransportOptions)`` returns a
    `torus_plugins.transfer.Transport`. Built in: ``cuda`` (copy stream + events), ``copy``
    (CPU copy worker, same ordering rules), ``simulated-link`` (the copy worker behind a link of
    configurable bandwidth and latency) and ``zero-copy`` (CPU, no copies). Called once per
    attach; the factory is called once for the attached model.
    """


@hookspec
def torus_stats_event(event: "StatsEvent") -> None:
    """Observe the engine's counters at coarse moments (all implementations are called).

    ``event.kind`` is ``"attached"``, ``"generation_finished"``, ``"reset"`` or ``"detached"``;
    ``event.stats`` is an `EngineStats` snapshot. Never called per token or per layer.
    Exceptions raised here are logged and ignored: an observer cannot break generation.
    """
