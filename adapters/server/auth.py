"""Optional API key: with one set, every route but `/health` needs `Authorization: Bearer <key>`.

Keys are compared in constant time (as SHA-256 digests, so not even the length leaks). Without a
key, the server accepts any `Authorization` header, or none.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health"})


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = _digest(api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and hmac.compare_digest(_digest(token), self._digest):
            await self.app(scope, receive, send)
            return
        why = "no API key given" if token is None else "the API key is wrong"
        err = ApiError(401, f"{why}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        await error_response(scope["path"], err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
