"""Optional API key: with one set, every route but `/health` needs `Authorization: Bearer <key>`.

Keys are compared in constant time (as SHA-256 digests, so not even the length leaks). Without a
key, the server accepts any `Authorization` header, or none. The key comes from `--api-key`,
`--api-key-file` or `$TORUS_SPARSE_API_KEY` (the last two keep it out of the process list); a
blank one from any of them is an error, never "no key".
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, error_response
from .settings import check_api_key

OPEN_PATHS = frozenset({"/health"})
KEY_ENV = "TORUS_SPARSE_API_KEY"


def resolve_api_key(flag: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    """The server's key from the flag, else the file, else the environment; None when none is given.

    Raises ValueError (with the source's name) for a blank key, an unreadable file, or both
    `--api-key` and `--api-key-file`. A key file's surrounding whitespace (its final newline) is
    dropped.
    """
    if flag is not None and file is not None:
        raise ValueError("give the key with --api-key or --api-key-file, not both")
    if flag is not None:
        return check_api_key(flag, "--api-key")
    if file is not None:
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ValueError(f"--api-key-file {file}: cannot read it ({why})") from None
        return check_api_key(text.strip(), f"--api-key-file {file}")
    if KEY_ENV in environ:
        return check_api_key(environ[KEY_ENV], f"${KEY_ENV}")
    return None


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
