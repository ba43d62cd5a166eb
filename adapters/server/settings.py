"""What one `torus-sparse serve` process is allowed to do: limits, defaults, the optional API key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Server-wide settings (the CLI flags of `torus-sparse serve`).

    model_name: the id `/v1/models` lists and every response names (requests may name any model).
    api_key: when set, every route but `/health` needs `Authorization: Bearer <api_key>`. An empty
        or blank key, or one with surrounding whitespace, is refused (no client could send it).
    allowed_hosts: the `Host` header values answered (names or addresses; `*.example.com` matches
        subdomains; ports are ignored); others get 400. `("*",)` answers any Host. None: `serve`
        decides from the address it binds (loopback: loopback names only, the DNS rebinding
        defence; any other: any Host); `create_app` alone then answers any Host.
    docs: serve `/docs`, `/redoc` and `/openapi.json` (their pages load Swagger UI / ReDoc from a CDN).
    max_batch_size: requests decoded together in one batch; more wait their turn.
    prefill_chunk: prefill prompts in chunks of this many tokens (deterministic boundaries); None:
        prompts up to 128 tokens in one pass, longer ones in chunks sized by time (`scheduler`).
    prefill_slice: seconds one turn of the scheduler (prefill chunks, then a decode step) aims at
        while requests decode: about the longest gap a stream sees while a long prompt prefills.
    max_pending: requests accepted at once (waiting, prefilling or decoding); beyond that, 429.
    max_body_bytes: larger request bodies get 413.
    context_length: the model's window; default: the model's `max_position_embeddings`.
    max_total_tokens: prompt + generated tokens one request may use (TGI's name); default: the context.
    max_input_tokens: the longest prompt accepted, in tokens; default: max_total_tokens - 1.
    max_tokens_limit: the most tokens one request may ask for; default: the context length.
    default_max_tokens: what a request that names no limit gets (capped by the room left).
    shutdown_timeout: seconds running generations get to finish after SIGTERM / Ctrl+C; then each
        remaining one ends with an error in its client's format (503, TGI "overloaded").
    timeout_keep_alive: seconds an idle keep-alive connection stays open (uvicorn's setting).
    header_timeout: seconds a connection may take to send a complete request head; then it is closed.
    body_timeout: seconds a request may take to send its body once the head is in; then 408.
    limit_concurrency: open connections (or requests in progress) beyond which uvicorn answers 503.
    """

    model_name: str = "torus-sparse"
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    docs: bool = False
    max_batch_size: int = 8
    prefill_chunk: int | None = None
    prefill_slice: float = 0.5
    max_pending: int = 64
    max_body_bytes: int = 1 << 20
    context_length: int | None = None
    max_total_tokens: int | None = None
    max_input_tokens: int | None = None
    max_tokens_limit: int | None = None
    default_max_tokens: int = 256
    shutdown_timeout: float = 10.0
    timeout_keep_alive: int = 5
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    limit_concurrency: int | None = 512

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_pending", "max_body_bytes", "default_max_tokens", "timeout_keep_alive"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        names = ("context_length", "max_total_tokens", "max_input_tokens", "max_tokens_limit", "limit_concurrency")
        for name in (*names, "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("header_timeout", "body_timeout", "prefill_slice"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must not be negative, got {self.shutdown_timeout}")
        if self.max_total_tokens is not None and self.context_length is not None:
            if self.max_total_tokens > self.context_length:
                raise ValueError(
                    f"max_total_tokens ({self.max_total_tokens}) cannot exceed context_length ({self.context_length})"
                )
        if self.max_input_tokens is not None and self.max_total_tokens is not None:
            if self.max_input_tokens >= self.max_total_tokens:
                raise ValueError(
                    f"max_input_tokens ({self.max_input_tokens}) must be less than max_total_tokens "
                    f"({self.max_total_tokens}): a reply needs at least one token"
                )
        if self.api_key is not None:
            check_api_key(self.api_key)
        if self.allowed_hosts is not None and not all(h.strip() for h in self.allowed_hosts):
            raise ValueError("allowed_hosts must not hold empty names")


def check_api_key(key: str, source: str = "api_key") -> str:
    """Refuse keys that would silently disable authentication or that no client can send."""
    if not key.strip():
        raise ValueError(
            f"{source} is empty or blank, which would leave the server open or locked to every client "
            "(an unset shell variable?); give a real key, or leave it out to run without one"
        )
    if key != key.strip():
        raise ValueError(f"{source} has leading or trailing whitespace, which no client sends; remove it")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError(f"{source} holds control characters, which an HTTP header cannot carry")
    return key
