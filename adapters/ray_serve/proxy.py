"""A middleware for Ray Serve's HTTP proxy: a stream whose replica died ends with a typed error.

When a replica's process dies mid-stream (killed, out of memory, its node lost), nothing on the
replica can answer any more, and Ray's proxy just stops: the client reads a cut chunked body
(`requests`' ChunkedEncodingError, `httpx`' RemoteProtocolError), not an error it can act on. This
middleware sits in the proxy and ends such a stream as the replica itself ends a failed one: an
OpenAI error event then `[DONE]` on `/v1/` routes (the `openai` client raises `APIError`), a TGI
error event elsewhere (the `text-generation` client raises its typed error). A request whose
replica died before it answered gets the proxy's 500 with a body in its route's error format
instead of plain text (the `openai` client retries it by default, and Ray sends the retry to a
live replica); so does the proxy's 503 when no replica can take a request.

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


#: The proxy's own plain-text errors that get the route's error format: (status -> message).
PROXY_ERRORS = {
    500: "the replica serving this request failed before it answered (it may have stopped); send the request again",
    503: "no replica can take this request now (all busy, starting or stopping); retry later",
}


def proxy_error(path: str, status: int) -> bytes:
    """The body of one of the proxy's own errors (`PROXY_ERRORS`) in the route's format: OpenAI's
    error object on `/v1/` (the `openai` client retries both, and Ray routes the retry to a live
    replica), TGI's elsewhere."""
    message = PROXY_ERRORS[status]
    if path.startswith("/v1/"):
        code = CODE if status == 500 else "overloaded"
        body: dict[str, Any] = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    else:
        body = {"error": message, "error_type": "generation" if status == 500 else "overloaded"}
    return json.dumps(body, separators=(",", ":")).encode()


class StreamEndGuard:
    """ASGI middleware around Ray's proxy app: an event stream that the app below leaves unfinished
    (it raised, or returned without the last body message) gets `ended_event` as its end. When no
    replica answered, the proxy's own 503 (no replica free) gets its body in the route's error
    format, and so does the 500 uvicorn would send when the proxy answered nothing at all (it does
    that when the replica died)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = stream = False
        replica: str | None = None
        rewrite: dict[str, Any] | None = None  # the proxy's own error response, held back

        async def watch(message: Any) -> None:
            nonlocal started, finished, stream, replica, rewrite
            if message["type"] == "http.response.start":
                headers = {name.lower(): value for name, value in message.get("headers", ())}
                replica = headers[b"x-torus-replica"].decode("latin-1") if b"x-torus-replica" in headers else None
                if replica is None and message["status"] in PROXY_ERRORS:
                    rewrite = message
                    return
                started = True
                stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and rewrite is not None:
                if not message.get("more_body", False):
                    await _send_error(send, scope["path"], rewrite)
                    started = finished = True
                return
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if not (started and stream and not finished):
                raise
        if not started and rewrite is None:  # the proxy answered nothing (a replica failed): uvicorn's text 500
            try:
                await _send_error(send, scope["path"], {"status": 500})
            except Exception:  # the client has gone
                pass
        elif started and stream and not finished:
            try:
                await send(
                    {"type": "http.response.body", "body": ended_event(scope["path"], replica), "more_body": False}
                )
            except Exception:  # the client has gone too
                pass


async def _send_error(send: Any, path: str, start: dict[str, Any]) -> None:
    body = proxy_error(path, start["status"])
    kept = [(k, v) for k, v in start.get("headers", ()) if k.lower() == b"retry-after"]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *kept]
    await send({"type": "http.response.start", "status": start["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
