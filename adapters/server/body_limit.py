"""Refuse request bodies over the limit with 413, and bodies that do not arrive within `timeout`
seconds with 408, before any route parses them.

The body is read here (at most `limit` bytes are ever held) and replayed to the app; after the
replay, `receive` passes through, so routes still see the client's disconnect. (uvicorn has no
body timeout of its own: a client could otherwise hold a request open forever, a byte at a time.)

A body somewhat over the limit (up to `drain` bytes) is read to its end and discarded before the
413 goes out: a client still sending when the server answers and closes sees its connection
reset instead of the 413 (the openai client then reports a connection error and retries). Larger
bodies are refused at once.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0, drain: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        #: bodies up to this size are read to their end (and dropped) before the 413
        self.drain = max(4 * limit, 1 << 20) if drain is None else drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(scope, receive, send, ApiError(400, "the Content-Length header is not a number"))
                return
            if size > self.limit:
                if size <= self.drain:
                    await self._discard(receive, size)
                await self._refuse(scope, receive, send, self._too_large(size))
                return
        body = bytearray()
        too_large = False
        with anyio.move_on_after(self.timeout) as late:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.limit:
                    too_large = True
                    break
                if not message.get("more_body", False):
                    break
        if too_large:
            await self._discard(receive, self.drain - len(body))
            await self._refuse(scope, receive, send, self._too_large(None))
            return
        if late.cancelled_caught:
            err = ApiError(
                408,
                f"the request body did not arrive within {self.timeout:g} s ({len(body)} bytes came)",
                code="request_timeout",
                tgi_status=408,
            )
            await self._refuse(scope, receive, send, err)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, budget: int) -> None:
        """Read and drop the rest of a refused body: at most `budget` bytes, within the timeout."""
        with anyio.move_on_after(self.timeout):
            while budget > 0:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

    def _too_large(self, size: int | None) -> ApiError:
        got = f" ({size} bytes)" if size is not None else ""
        return ApiError(
            413, f"the request body is too large{got}; the limit is {self.limit} bytes", code="request_too_large"
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        await error_response(scope["path"], err, {"Connection": "close"})(scope, receive, send)
