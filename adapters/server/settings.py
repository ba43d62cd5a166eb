"""What one `torus-sparse serve` process is allowed to do: limits, defaults, the optional API key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Server-wide settings (the CLI flags of `torus-sparse serve`).

    model_name: the id `/v1/models` lists and every response names (requests may name any model).
    api_key: when set, every route but `/health` needs `Authorization: Bearer <api_key>`.
    max_batch_size: requests decoded together in one batch; more wait their turn.
    max_pending: requests accepted at once (running + waiting); beyond that, 429 "overloaded".
    max_body_bytes: larger request bodies get 413.
    context_length: prompt + generated tokens allowed; default: the model's `max_position_embeddings`.
    max_tokens_limit: the most tokens one request may ask for; default: the context length.
    default_max_tokens: what a request that names no limit gets (capped by the room left in the context).
    """

    model_name: str = "torus-sparse"
    api_key: str | None = None
    max_batch_size: int = 8
    max_pending: int = 64
    max_body_bytes: int = 1 << 20
    context_length: int | None = None
    max_tokens_limit: int | None = None
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_pending", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("context_length", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset to accept any key)")
