"""What both wire formats share: turning prompts into token ids, checking them against the context,
and starting a generation (and stopping it when the client goes away)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable, Sequence

from starlette.requests import Request

from torus_plugins import __version__

from .errors import ApiError, bad_request
from .generation import Completion, GenerationFailed, GenerationRequest, Handle
from .scheduler import Overloaded, Scheduler
from .settings import ServerSettings


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was cancelled."""


def check_text(value: str, param: str) -> str:
    """Reject strings the tokenizer cannot encode (lone surrogates from `\\ud800` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
    return value


def stop_strings(stop: str | Sequence[str] | None, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    return tuple(check_text(s, f"{param}[{i}]") for i, s in enumerate(items))


class ModelService:
    """One served model: its tokenizer, its limits and its scheduler."""

    def __init__(self, tm: Any, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.tm = tm
        self.scheduler = scheduler
        self.settings = settings
        config = tm.model.config
        model_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.context_length = settings.context_length or int(model_ctx)
        self.max_tokens_limit = min(settings.max_tokens_limit or self.context_length, self.context_length)
        self.model_name = settings.model_name
        self.created = int(time.time())
        self.fingerprint = f"torus-sparse-{__version__}"

    # ------------------------------------------------------------------ prompts
    def encode_chat(self, messages: Iterable[dict[str, str]]) -> list[int]:
        from torus_adapters.transformers_adapter import PromptError

        checked = [
            {"role": m["role"], "content": check_text(m["content"], f"messages[{i}].content")}
            for i, m in enumerate(messages)
        ]
        try:
            return self.tm.encode(checked, chat=True)["input_ids"][0].tolist()
        except PromptError as exc:
            raise bad_request(str(exc), "messages") from None
        except Exception as exc:  # a chat template may refuse an order of roles, e.g. with a jinja error
            raise bad_request(f"the model's chat template rejected these messages: {exc}", "messages") from None

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        ids = self.tm.encode(check_text(text, param), chat=False)["input_ids"][0].tolist()
        if not ids:
            raise bad_request(f"{param} must not be empty", param)
        return ids

    def max_new_tokens(
        self, prompt_len: int, requested: int | None, param: str = "max_tokens", default: int | None = None
    ) -> int:
        """How many tokens this request may generate; `ApiError` when it cannot fit the context.

        Without `requested`: `default` (else the server's), capped by the limit and the room left."""
        ctx = self.context_length
        if prompt_len >= ctx:
            raise bad_request(
                f"the prompt is {prompt_len} tokens but this model's context holds {ctx}; shorten it",
                "messages" if param == "max_tokens" else "inputs",
                "context_length_exceeded",
            )
        room = ctx - prompt_len
        if requested is None:
            return min(default or self.settings.default_max_tokens, room, self.max_tokens_limit)
        if requested > self.max_tokens_limit:
            raise bad_request(f"{param} is {requested} but this server allows at most {self.max_tokens_limit}", param)
        if requested > room:
            raise bad_request(
                f"this model's context holds {ctx} tokens; the prompt uses {prompt_len}, so {param} can be at "
                f"most {room} (got {requested})",
                param,
                "context_length_exceeded",
            )
        return requested

    # ------------------------------------------------------------------ generation
    def start(self, request: GenerationRequest) -> Handle:
        try:
            return self.scheduler.submit(request)
        except Overloaded as exc:
            raise ApiError(429, f"model is overloaded: {exc}", code="overloaded") from None

    async def complete(self, handle: Handle, request: Request) -> Completion:
        """Wait for the whole answer; cancel the generation if the client disconnects first."""
        collect = asyncio.ensure_future(handle.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                raise ClientGone()
            try:
                return collect.result()
            except GenerationFailed as exc:
                raise ApiError(500, str(exc), tgi_status=424, tgi_type="generation") from None
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
            handle.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
