"""One replica of the server behind a router (Ray Serve: `torus_adapters.ray_serve`): the app
`torus-sparse serve` builds, plus what a fleet needs from each member. Imports no Ray: it is
tested in process.

- Its id on every answer (`X-Torus-Replica`) and on `GET /torus/stats` (its scheduler counters and
  its engine's stats), so a client or a test sees which replica answered and what each has done.
- `reconfigure(config)`: re-attach the engine with another `TorusConfig` (same weights). New
  requests wait at a gate (they are not refused), those in flight finish on the old engine (after
  `shutdown_timeout` seconds the rest end with the server's "shutting down" error), then the
  engine is re-attached and the gate opens. A config that fails to attach leaves the previous one.
- `check_health()`: raises when the engine cannot serve: the scheduler thread has stopped, no
  engine is attached, or since the last check two or more requests failed and no forward pass
  succeeded (`EngineFailed`). One failed request alone is that request's problem, not the engine's.
- `shutdown()`: the server's own drain (`ModelService.drain`: `shutdown_timeout` seconds of grace,
  then typed errors), then the scheduler and the service close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from typing import Any, Awaitable, Callable

import torch
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from .app import create_app
from .generation import ERROR
from .scheduler import Scheduler
from .settings import ServerSettings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-torus-replica"
STATS_ROUTE = "/torus/stats"


class EngineFailed(RuntimeError):
    """The replica's engine cannot serve (what a router's health check sees)."""


class _Gate:
    """ASGI wrapper: holds HTTP requests while the engine is swapped, counts those inside, and
    names the replica on every answer. Its lifespan's shutdown is `on_shutdown` (the replica's
    drain and close), in place of the app's own (which would close the service before the drain)."""

    def __init__(self, app: FastAPI, replica_id: str, on_shutdown: Callable[[], Awaitable[None]]) -> None:
        self.app = app
        self.on_shutdown = on_shutdown
        self.inside = 0
        self._header = (REPLICA_HEADER.encode(), replica_id.encode("latin-1", "replace"))
        self._open: asyncio.Event | None = None  # made on the serving loop, at the first request

    def __getattr__(self, name: str) -> Any:  # a router adds its exception handlers to the app
        return getattr(self.app, name)

    @property
    def opened(self) -> asyncio.Event:
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        return self._open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.opened.wait()
        self.inside += 1

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        try:
            await self.app(scope, receive, named)
        finally:
            self.inside -= 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.on_shutdown()
                except Exception as exc:  # logged by the router; the process is going anyway
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return


class Replica:
    """A loaded `TorusModel` served by `create_app`, with its id, health and live reconfiguration."""

    def __init__(self, tm: Any, settings: ServerSettings, replica_id: str) -> None:
        self.tm = tm
        self.settings = settings
        self.replica_id = replica_id
        self.scheduler = Scheduler.for_model(
            tm,
            max_batch_size=settings.max_batch_size,
            max_pending=settings.max_pending,
            prefill_chunk=settings.prefill_chunk,
            prefill_slice=settings.prefill_slice,
        )
        self.app = create_app(tm, settings, scheduler=self.scheduler)
        self.service = self.app.state.service
        self.started = time.time()
        self.reconfigurations = 0
        self._closed = False
        self._swapping = False
        self._seen = self._progress()
        self._add_stats_route()
        self.asgi = _Gate(self.app, replica_id, self.shutdown)

    # ------------------------------------------------------------------ stats
    def _add_stats_route(self) -> None:
        @self.app.get(STATS_ROUTE, tags=["Both"], summary="This replica's id, counters and engine stats")
        async def torus_stats() -> dict[str, Any]:
            return self.stats()

    def stats(self) -> dict[str, Any]:
        c = self.scheduler.counters
        engine = self.tm.stats().as_dict()
        engine.pop("layers", None)
        return {
            "replica": self.replica_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "uptime_s": round(time.time() - self.started, 3),
            "reconfigurations": self.reconfigurations,
            "config": dataclasses.asdict(self.tm.config),
            "requests": {
                "finished": dict(c.finished),
                "running": c.running,
                "waiting": c.waiting,
                "in_flight": self.scheduler.in_flight,
            },
            "tokens": {"prompt": c.prompt_tokens, "generated": c.generated_tokens},
            "passes": {"prefills": c.prefills, "decode_steps": c.decode_steps},
            "engine": engine,
        }

    # ------------------------------------------------------------------ health
    def _progress(self) -> tuple[int, int]:
        """(requests that ended in error, forward passes that succeeded), as the scheduler counts them."""
        c = self.scheduler.counters
        return c.finished.get(ERROR, 0), c.prefill_chunks + c.decode_steps

    def check_health(self) -> None:
        """Raise `EngineFailed` when this replica cannot serve; cheap (no forward pass)."""
        from torus_plugins.errors import NotAttachedError
        from torus_plugins.lifecycle import get_engine

        thread = getattr(self.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive() and not self.service.draining:
            raise EngineFailed("the scheduler thread has stopped")
        try:
            get_engine(self.tm.model)
        except NotAttachedError:
            if not self._swapping:  # `reconfigure` detaches it for a moment
                raise EngineFailed("no engine is attached to the model") from None
        errors, passes = self._progress()
        # two or more failures and not one good pass: the model fails, not one odd request
        failed = errors - self._seen[0]
        ok = passes > self._seen[1]
        self._seen = (errors, passes)
        if failed >= 2 and not ok:
            raise EngineFailed(f"{failed} requests failed since the last health check and no forward pass succeeded")

    # ------------------------------------------------------------------ reconfigure
    async def reconfigure(self, config: Any) -> bool:
        """Re-attach the engine with `config` (a `TorusConfig`); False when it is the current one."""
        from torus_plugins.lifecycle import attach, detach

        if config == self.tm.config:
            return False
        gate = self.asgi
        gate.opened.clear()
        self._swapping = True
        try:
            await self._quiesce()
            previous = self.tm.config
            loop = asyncio.get_running_loop()

            def swap() -> None:
                model = detach(self.tm.model)
                try:
                    attach(model, config)
                except Exception:
                    attach(model, previous)  # worked a moment ago
                    raise

            await loop.run_in_executor(None, swap)
            self.reconfigurations += 1
            log.info("replica %s: engine re-attached with %s", self.replica_id, config)
            return True
        finally:
            self._swapping = False
            gate.opened.set()

    async def _quiesce(self) -> None:
        """Wait for the requests inside the gate; after `shutdown_timeout` seconds end the
        generations still running with the server's typed error, as a shutdown would."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        while (self.asgi.inside or self.scheduler.in_flight) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.asgi.inside or self.scheduler.in_flight:
            await self.service.drain(0)
            self.service.draining = False  # open again once the engine is swapped
            while self.asgi.inside or self.scheduler.in_flight:
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        """The server's drain (grace, then typed errors), then close the service and scheduler."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.service.drain(self.settings.shutdown_timeout)
        finally:
            self.service.close()
            self.scheduler.close()
