"""Run the server with uvicorn (what `torus-sparse serve` calls), with its limits and its drain.

- Limits: uvicorn's keep-alive timeout and concurrency cap (`timeout_keep_alive`,
  `limit_concurrency`: beyond it uvicorn answers 503); the connection protocol (`connection`)
  adds a deadline for the request head (`header_timeout`), caps on the head (16 KiB, 100
  headers: 431) and answers half-closed requests. Slow bodies get 408 in `body_limit`.
- Shutdown (SIGTERM, Ctrl+C): uvicorn stops accepting at once; `ModelService.drain` gives the
  generations in flight `shutdown_timeout` seconds, then ends each remaining one with an error
  its client parses (an error event, or 503 / TGI "overloaded"), which leaves uvicorn's own
  grace nothing to cut. A second Ctrl+C during that grace ends it at once (the same typed errors
  now), instead of uvicorn's forced exit, which cut streams and aborted the process.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import socket
from typing import Any

import uvicorn

from torus_plugins import ConfigError

from .connection import connection_protocol
from .hosts import allowed_hosts_for
from .settings import ServerSettings

#: Seconds uvicorn waits, after the drain's grace, for the error events and 503s to be written.
_FLUSH_S = 5


def default_model_name(model_arg: str | None) -> str:
    """The id clients see: the embedded default's name, else the model path's or Hub id's last part."""
    if model_arg is None:
        from torus_adapters.transformers_adapter.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    name = os.path.basename(os.path.normpath(os.path.expanduser(model_arg)))
    return name.removesuffix(".gguf") or model_arg


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind `host:port` now, as uvicorn would (SO_REUSEADDR, IPv6 for an address with a colon), so a
    taken port is one line before the model loads, not an error after it. The socket then goes to
    `serve`, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over connections in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(_bind_error(host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop what listens there or pick another port with --port"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} of {host} (below 1024 needs root); pick --port 1024 or above"
    reason = exc.strerror or str(exc)
    return f"cannot listen on {host} port {port} ({reason}); pass --host with an address of this machine"


class Server(uvicorn.Server):
    """uvicorn's server, draining the app's generations when it shuts down."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.service = app.state.service

    def handle_exit(self, sig: int, frame: Any) -> None:
        import signal

        if self.should_exit and sig == signal.SIGINT:  # uvicorn would force an exit: end the grace instead
            self.service.hurry()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.ensure_future(self.service.drain(self.service.settings.shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            if not drain.done():
                drain.cancel()


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Server:
    """A uvicorn server for an app made by `create_app`, with the limits in its `ServerSettings`."""
    settings: ServerSettings = app.state.service.settings
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=connection_protocol(settings.header_timeout),
        loop="asyncio",  # not uvloop, which the `ray` extra installs: the loop the tests pass on, whatever is installed
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.limit_concurrency,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout) + _FLUSH_S,
    )
    return Server(config, app)


def serve(
    tm: Any,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serve `tm` until SIGTERM or Ctrl+C (then drain, see above). When `settings.allowed_hosts`
    is None and `host` is a loopback address, only loopback Host names are answered. `sock`: a
    socket `bind_socket` bound to `host:port` (else uvicorn binds when it starts)."""
    from dataclasses import replace

    from .app import create_app

    if settings.allowed_hosts is None:
        settings = replace(settings, allowed_hosts=allowed_hosts_for(host))
    try:
        make_server(create_app(tm, settings), host, port, log_level).run(sockets=None if sock is None else [sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled (as `uvicorn.run` would, swallow it)
        pass
