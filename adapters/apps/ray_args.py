"""`torus-sparse serve --ray`: the same server as replicas on Ray Serve (the extra `torus-sparse[ray]`).

    torus-sparse serve --ray --replicas 2
    torus-sparse serve --ray --autoscale 1:4 --ray-address auto --replica-gpus 1

Every other `serve` flag means what it means without `--ray` (each replica runs the same app with
the same limits and key). Wrong input is one line and exit 2, before Ray starts or a model loads.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from torus_plugins import ConfigError, TorusConfig

if TYPE_CHECKING:  # the server package imports the whole app: only when a command runs it
    from ..server.settings import ServerSettings

#: The flags that mean something only with --ray (dest -> flag).
RAY_ONLY = {
    "replicas": "--replicas",
    "autoscale": "--autoscale",
    "ray_address": "--ray-address",
    "replica_cpus": "--replica-cpus",
    "replica_gpus": "--replica-gpus",
}


def add_ray_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("replicas on Ray Serve (pip install 'torus-sparse[ray]')")
    r.add_argument(
        "--ray",
        action="store_true",
        help="serve replicas behind Ray Serve's proxy on --host/--port (starts a local cluster unless --ray-address)",
    )
    r.add_argument("--replicas", metavar="N", help="replicas, each with its own engine (default 1)")
    r.add_argument(
        "--autoscale", metavar="MIN:MAX", help="let Ray scale between MIN and MAX replicas on outstanding requests"
    )
    r.add_argument("--ray-address", metavar="ADDRESS", help="join this Ray cluster (e.g. auto, or ray://head:10001)")
    r.add_argument("--replica-cpus", metavar="N", help="CPUs Ray reserves for each replica (default 1)")
    r.add_argument(
        "--replica-gpus",
        metavar="N",
        help="GPUs for each replica; Ray picks which (default: 1 if CUDA is here, else 0)",
    )


def _count(flag: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{flag} takes a whole number of replicas, at least 1; got {text!r}")
    return int(text)


def _amount(flag: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value != value or value == float("inf"):
        raise ConfigError(f"{flag} takes a number of {what}, 0 or more (fractions share one); got {text!r}")
    return value


def autoscale_range(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (min, max), with 0 <= min <= max and max >= 1."""
    low, sep, high = text.partition(":")
    if sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1:
        return int(low), int(high)
    raise ConfigError(
        f"--autoscale takes MIN:MAX replicas, whole numbers with MIN <= MAX and MAX at least 1 (e.g. 1:4); got {text!r}"
    )


def check_ray_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray options as `torus_app` and `run` take them; `ConfigError` for any wrong one."""
    given = [flag for dest, flag in RAY_ONLY.items() if getattr(args, dest) is not None]
    if not args.ray:
        if given:
            raise ConfigError(f"{given[0]} needs --ray (replicas on Ray Serve)")
        return {}
    if args.replicas is not None and args.autoscale is not None:
        raise ConfigError("--replicas and --autoscale are exclusive: a fixed count or a range")
    gpus = args.replica_gpus
    if gpus is None:
        import torch

        gpus_n = 1.0 if (torch.cuda.is_available() and args.device in (None, "cuda")) else 0.0
    else:
        gpus_n = _amount("--replica-gpus", gpus, "GPUs")
    cpus = 1.0 if args.replica_cpus is None else _amount("--replica-cpus", args.replica_cpus, "CPUs")
    return dict(
        num_replicas=None if args.autoscale is not None else _count("--replicas", args.replicas or "1"),
        autoscale=None if args.autoscale is None else autoscale_range(args.autoscale),
        num_cpus=cpus,
        num_gpus=gpus_n,
    )


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `--ray-address` of host:port (or ray://host:port) that nothing answers is one line now:
    `ray.init` would retry it for minutes before failing. "auto" and other forms go to Ray as is."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the cluster first "
            f"(ray start --head) or leave --ray-address out to start a local one"
        ) from None


def serve_on_ray(args: argparse.Namespace, settings: "ServerSettings", config: TorusConfig, console: Any) -> int:
    """Start (or join) a cluster, run the replicas behind Ray's proxy, serve until SIGTERM/Ctrl+C."""
    options = check_ray_args(args)
    try:
        from ..ray_serve import deployment
    except ImportError as exc:
        if getattr(exc, "name", "") and exc.name.split(".")[0] == "ray":
            raise ConfigError(
                "--ray needs Ray Serve, which is not installed: pip install 'torus-sparse[ray]'"
            ) from None
        raise
    from ..server.run import bind_socket
    from ..transformers_adapter.model_source import open_model

    if args.ray_address is not None:
        check_reachable(args.ray_address)
    port = args.port
    if args.ray_address is None:  # a local cluster's proxy binds here: a taken port is one line now
        sock = bind_socket(args.host, args.port)
        port = sock.getsockname()[1]  # --port 0: a free one, chosen now (Ray's proxy needs a number)
        sock.close()
    open_model(args.model)  # a model that cannot load is one line here, not a traceback from each replica
    app = deployment.torus_app(args.model, config, settings, **options)
    count = f"{options['autoscale'][0]}-{options['autoscale'][1]}" if options["autoscale"] else options["num_replicas"]

    def announce(url: str) -> None:
        console.print(
            f"serving [bold]{settings.model_name}[/bold] at {url} on Ray Serve: {count} replica(s), "
            f"{options['num_cpus']:g} CPU and {options['num_gpus']:g} GPU each (OpenAI: /v1, TGI: /generate)"
        )

    try:
        deployment.run(
            app,
            host=args.host,
            port=port,
            address=args.ray_address,
            keep_alive=settings.timeout_keep_alive,
            announce=announce,
        )
    except deployment.StartFailed as exc:
        raise ConfigError(str(exc)) from None
    return 0
