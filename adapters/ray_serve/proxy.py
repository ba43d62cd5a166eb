"""A middleware for Ray Serve's HTTP proxy: a stream whose replica died ends with a typed error.

When a replica's process dies mid-stream (killed, out of memory, its node lost), nothing on the
replica can answer any more, and Ray's proxy just stops: the client reads a cut chunked body
(`requests`' ChunkedEncodingError, `httpx`' RemoteProtocolError), not an error it can act on. This
middleware sits in the proxy and ends such a stream as the replica itself ends a failed one: an
OpenAI error event then `[DONE]` on `/v1/` routes (the `openai` client raises `APIError`), a TGI
error event elsewhere (the `text-generation` client raises its typed error).

The proxy loads it through Ray's hook, set in the environment of the processes that start the
cluster's nodes (`deployment.run` sets it for a cluster it starts; a cluster you start yourself
needs it in its environment, see docs/ray.md):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=torus_adapters.ray_serve.proxy:proxy_middlewares

Imports nothing of the server (the proxy process loads no torch): the two error bodies are the
server's `errors.openai_body` and `errors.tgi_body`, written out (a test holds them equal).
"""

from __future__ import annotations

import json
from typing import Any

CALLBACK = "torus_adapters.ray_serve.proxy:proxy_middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CODE = "replica_failed"


def proxy_middlewares() -> list[Any]:
    """Ray's proxy callback: the middlewares its HTTP app is wrapped in."""
    from starlette.middleware import Middleware

    return [Middleware(StreamEndGuard)]


def ended_event(path: str, replica: str | None) -> bytes:
    """The last bytes of a stream whose replica stopped before the stream's end."""
    who = f"replica {replica}" if replica else "the replica"
    message = f"{who} serving this stream stopped before it finished; send the request again"
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": CODE}}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
    body = {"error": message, "error_type": "generation"}
    return f"data:{json.dumps(body, separators=(',', ':'))}\n\n".encode()


class StreamEndGuard:
    """ASGI middleware: an event stream that the app below leaves unfinished (it raised, or returned
    without the last body message) gets `ended_event` as its end."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = stream = False
        replica: str | None = None

        async def watch(message: Any) -> None:
            nonlocal started, finished, stream, replica
            if message["type"] == "http.response.start":
                started = True
                for name, value in message.get("headers", ()):
                    name = name.lower()
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        stream = True
                    elif name == b"x-torus-replica":
                        replica = value.decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if not (started and stream and not finished):
                raise
        if started and stream and not finished:
            try:
                await send(
                    {"type": "http.response.body", "body": ended_event(scope["path"], replica), "more_body": False}
                )
            except Exception:  # the client has gone too
                pass
