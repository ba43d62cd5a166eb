"""The `Host` header check that keeps a web page from reaching a loopback server (DNS rebinding).

A page on `attacker.example` can make the user's browser resolve that name to 127.0.0.1 and then
read the answers of a key-less server there; every such request carries `Host: attacker.example`.
So a server bound to a loopback address answers only Host values that name loopback (plus the
operator's `--allowed-host` additions) and refuses the rest with 400 in its client's error format.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, error_response

#: Names that always mean this machine (browsers resolve `*.localhost` to loopback themselves).
LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.1", "::1")


def is_loopback(bind_host: str) -> bool:
    """Whether a bind address reaches only this machine (`127.x.y.z`, `::1`, `localhost`)."""
    if bind_host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What `ServerSettings.allowed_hosts` should be for a server bound to `bind_host`.

    Loopback binds answer loopback names plus `extra`; other binds answer any Host unless `extra`
    names some (then loopback names plus those). `"*"` in `extra` answers any Host.
    """
    if "*" in extra or not (is_loopback(bind_host) or extra):
        return ("*",)
    return LOOPBACK_HOSTS + tuple(extra)


def host_name(header: bytes) -> str:
    """The name part of a Host header value: no port, no brackets, lower case, no final dot."""
    value = header.decode("latin-1").strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    try:  # every 127.x.y.z is loopback, not only 127.0.0.1
        return "127.0.0.1" in allowed and ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        if header is not None and host_allowed(host_name(header), self.allowed):
            await self.app(scope, receive, send)
            return
        shown = header.decode("latin-1")[:100] if header is not None else "(none)"
        err = ApiError(
            400,
            f"this server does not answer for Host {shown!r}; start it with --allowed-host NAME to add a name",
            code="invalid_host",
            tgi_status=400,
        )
        await error_response(scope["path"], err, {"Connection": "close"})(scope, receive, send)
