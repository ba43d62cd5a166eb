"""torus-sparse replicas on Ray Serve: the app `torus-sparse serve` builds, one engine per replica.

    from torus_adapters.ray_serve.deployment import torus_app
    serve.run(torus_app(None, TorusConfig(), ServerSettings(), num_replicas=2), route_prefix="/")

Installed with the extra `torus-sparse[ray]`; only `torus-sparse serve --ray` imports this module
(the core and the plain server run without Ray).

- `TorusDeployment`: `@serve.ingress`'d with the app built at replica start
  (`__serve_build_asgi_app__`): each replica loads the model with its own `TorusConfig` on the
  device Ray gave it (`ray_actor_options={"num_gpus": 1}`: Ray sets `CUDA_VISIBLE_DEVICES`) and
  serves it through `server.replica.Replica` (its id on every answer and on `/torus/stats`, health,
  live re-attach, the server's drain at shutdown).
- `reconfigure(user_config)`: `{"torus": {TorusConfig fields}}` over the config the deployment was
  bound with; a change re-attaches the engine in place (requests wait, none is refused).
- Shutdown: Ray stops routing to the replica and waits up to `graceful_shutdown_timeout_s`
  (`shutdown_timeout` + 5 s) for its requests, then the app's lifespan ends through
  `Replica.shutdown` (the server's drain, then close). Ray gives a replica no signal when its
  drain starts; a stream still running at Ray's deadline ends with the proxy's typed error (`proxy`).
- `check_health()`: fails when the engine fails (`Replica.check_health`); Ray then replaces the replica.
- Metrics: each replica's `/metrics` stays its own; every 10 s its `torus_*` samples are copied into
  Ray Serve's metrics as `torus_replica_*` gauges, tagged with the replica (`MetricsMirror`).
- Routing is Ray's default: the power of two choices on outstanding requests. There is no prefix
  cache yet, so there is nothing for prefix-affinity routing to win.
- `app_builder(args)`: the import path for `serve run` / `serve deploy` config files (docs/ray.md).
- `run(...)`: what `torus-sparse serve --ray` calls.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

from ray import serve

from torus_plugins import ConfigError, TorusConfig

from ..server.replica import Replica
from ..server.settings import ServerSettings
from . import proxy

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "torus-sparse"
APP_NAME = "torus-sparse"
API_KEY_ENV = "TORUS_SPARSE_API_KEY"  # what `serve` reads too (`server.auth.resolve_api_key`)
#: Seconds Ray waits beyond the drain's grace before it kills a replica (uvicorn's flush in `run.py`).
_FLUSH_S = 5
#: Seconds between two copies of a replica's metrics into Ray's.
METRICS_PERIOD_S = 10.0


class StartFailed(ConfigError):
    """The application did not start on Ray (a replica's constructor failed, no resources)."""


def _torus_config(base: TorusConfig, fields: Mapping[str, Any] | None) -> TorusConfig:
    known = {f.name for f in dataclasses.fields(TorusConfig)}
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        raise ConfigError(f"unknown TorusConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **dict(fields or {}))


class MetricsMirror:
    """Copies a Prometheus registry's `torus_*` samples into gauges made by `make_gauge(name,
    description, tag_keys)` (in a replica: Ray Serve's, which add the replica's tags), named
    `torus_replica_<rest>`; `update()` sets each to its current value."""

    def __init__(self, registry: Any, make_gauge: Callable[[str, str, tuple[str, ...]], Any]) -> None:
        self.registry = registry
        self.make_gauge = make_gauge
        self.gauges: dict[str, Any] = {}

    def update(self) -> int:
        n = 0
        for family in self.registry.collect():
            if not family.name.startswith("torus_"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation times: not a reading
                    continue
                name = "torus_replica_" + sample.name.removeprefix("torus_")
                gauge = self.gauges.get(name)
                if gauge is None:
                    gauge = self.gauges[name] = self.make_gauge(
                        name, family.documentation, tuple(sorted(sample.labels))
                    )
                gauge.set(sample.value, tags=dict(sample.labels) or None)
                n += 1
        return n

    def run(self, stop: threading.Event, period: float = METRICS_PERIOD_S) -> None:
        while not stop.wait(period):
            try:
                self.update()
            except Exception:  # a metrics hiccup must not end the replica
                log.exception("copying the replica's metrics into Ray's failed")


def _serve_gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.serve import metrics

    return metrics.Gauge(name, description=description, tag_keys=tag_keys)


@serve.ingress()
class TorusDeployment:
    """One replica: a model, its engine and the server's app."""

    def __init__(self, model: str | None, config: TorusConfig, settings: ServerSettings) -> None:
        from torus_plugins import TorusModel

        self._base = config
        replica_id = serve.get_replica_context().replica_id.unique_id
        tm = TorusModel.from_pretrained(model, config, show_progress=False)
        self.replica = Replica(tm, settings, replica_id)
        self._stop = threading.Event()
        mirror = MetricsMirror(self.replica.app.state.metrics.registry, _serve_gauge)
        threading.Thread(target=mirror.run, args=(self._stop,), name="torus-ray-metrics", daemon=True).start()
        log.info("replica %s: %s loaded on %s", replica_id, model or "the embedded model", tm.engine.device)

    def __serve_build_asgi_app__(self) -> Any:
        return self.replica.asgi

    async def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        await self.replica.reconfigure(_torus_config(self._base, (user_config or {}).get("torus")))

    def check_health(self) -> None:
        self.replica.check_health()

    def __del__(self) -> None:  # after the app's lifespan shutdown (the drain): stop copying metrics
        self._stop.set()


def torus_app(
    model: str | None,
    config: TorusConfig,
    settings: ServerSettings,
    *,
    num_replicas: int | None = 1,
    autoscale: tuple[int, int] | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    user_config: Mapping[str, Any] | None = None,
) -> Any:
    """The bound application: `num_replicas` replicas, or between `autoscale` = (min, max) of them
    (Ray scales on outstanding requests per replica, aiming at half the batch size). Each replica
    gets `num_cpus` CPUs and `num_gpus` GPUs from Ray. A replica accepts up to `max_pending`
    requests, as the plain server does (beyond them, its own 429)."""
    options: dict[str, Any] = dict(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=settings.max_pending,
        graceful_shutdown_timeout_s=settings.shutdown_timeout + _FLUSH_S,
    )
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": low,
            "target_ongoing_requests": max(1, settings.max_batch_size // 2),
        }
    else:
        options["num_replicas"] = num_replicas
    if user_config is not None:
        options["user_config"] = dict(user_config)
    return serve.deployment(**options)(TorusDeployment).bind(model, config, settings)


def app_builder(args: Mapping[str, Any]) -> Any:
    """For `serve run` / `serve deploy`: `args` = {"model": path or Hub id (absent: the embedded
    model), "torus": {TorusConfig fields}, "server": {ServerSettings fields}}. Replica counts,
    autoscaling and resources go in the config file's `deployments:` section."""
    unknown = sorted(set(args) - {"model", "torus", "server"})
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; expected model, torus, server")
    server = dict(args.get("server") or {})
    if server.get("api_key") is None and os.environ.get(API_KEY_ENV):
        server["api_key"] = os.environ[API_KEY_ENV]
    if "allowed_hosts" in server and server["allowed_hosts"] is not None:
        server["allowed_hosts"] = tuple(server["allowed_hosts"])
    try:
        settings = ServerSettings(**server)
    except TypeError as exc:
        raise ConfigError(f"server: {exc}") from None
    return torus_app(args.get("model"), _torus_config(TorusConfig(), args.get("torus")), settings)


def run(
    app: Any,
    *,
    host: str,
    port: int,
    address: str | None,
    num_cpus: int | None = None,
    keep_alive: int = 5,
    announce: Any = print,
) -> None:
    """Start a local Ray cluster (or join `address`), run `app` behind Ray's HTTP proxy on
    `host:port` (idle connections kept `keep_alive` seconds), and serve until SIGTERM or Ctrl+C;
    then delete the application (Ray drains each replica, then its app's drain runs) and leave the
    cluster. Joining a cluster whose Serve already runs keeps that proxy's address and settings."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(proxy.ENV, proxy.CALLBACK)  # inherited by the nodes a local cluster starts
    try:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["no reason given"])[0]
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise StartFailed(f"cannot {where}: {first}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # Ray's message ends with the replica's traceback: its last line says why
            last = [line for line in str(exc).splitlines() if line.strip()][-1:] or ["no reason given"]
            raise StartFailed(
                f"the replicas did not start on Ray: {last[0].strip()} (the replicas' logs: /tmp/ray/session_latest/logs)"
            ) from None
        announce(f"http://{host}:{port}")
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME)
            if address is None:
                serve.shutdown()
        finally:
            ray.shutdown()
