"""What both wire formats share: parsing and tokenizing requests off the event loop, the token
limits, starting a generation (and stopping it when the client goes away), and the drain on
shutdown.

The event loop only moves bytes: `prepare` runs a route's parse-validate-template-tokenize step
in one of `PREPARE_THREADS` worker threads (more requests queue for them), so a megabyte of
hostile JSON or a 200,000-token prompt delays other requests' preparation, never another
client's token stream. The workers run at a lower CPU priority (Linux: per-thread nice), so on a
small machine a burst of them leaves the decode thread and the event loop their share.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from starlette.requests import Request

from torus_plugins import __version__

from .constraints import Grammars
from .errors import ApiError, bad_request, log_reference, shutting_down
from .generation import (
    GRAMMAR_FAILED,
    SHUTTING_DOWN,
    Completion,
    GenerationFailed,
    GenerationRequest,
    Handle,
    Step,
)
from .scheduler import Overloaded, Scheduler
from .settings import ServerSettings
from .tools import FALLBACK, render_messages, template_format

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Requests parsed and tokenized at once, each in a worker thread: half the cores, 2 to 4 (two, so
#: one slow request cannot hold up every other one's preparation).
PREPARE_THREADS = min(4, max(2, (os.cpu_count() or 2) // 2))
#: How much lower the workers' CPU priority is than the server's (nice increment, Linux).
PREPARE_NICE = 10


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was cancelled."""


def check_text(value: str, param: str) -> str:
    """Reject strings the tokenizer cannot encode (lone surrogates from `\\ud800` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
    return value


def require_json(request: Request) -> None:
    """Generation routes take JSON only. A web page can make a browser POST `text/plain`, form or
    multipart bodies to any address without asking first (a CORS "simple" request), loopback
    included; a body declared `application/json` it cannot send without the server's consent. So
    any other Content-Type, or none, is a 415, whatever the key setting."""
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"Content-Type {declared[:60]!r}" if declared else "no Content-Type"
        raise ApiError(
            415,
            f"the request body must be JSON sent as Content-Type: application/json (got {got})",
            code="unsupported_media_type",
        )


def stop_strings(stop: str | Sequence[str] | None, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    return tuple(check_text(s, f"{param}[{i}]") for i, s in enumerate(items))


def failure(exc: GenerationFailed | Step) -> ApiError:
    """The error a client gets for a generation that ended in an error."""
    message = (exc.message if isinstance(exc, GenerationFailed) else exc.error) or "generation failed"
    if exc.cause == SHUTTING_DOWN:
        return shutting_down(message)
    if exc.cause == GRAMMAR_FAILED:
        return bad_request(message, "response_format")
    return ApiError(500, message, tgi_status=424, tgi_type="generation")


class ModelService:
    """One served model: its tokenizer, its limits, its scheduler, and the generations it started."""

    def __init__(self, tm: Any, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.tm = tm
        self.scheduler = scheduler
        self.settings = settings
        config = tm.model.config
        model_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.context_length = settings.context_length or int(model_ctx)
        self.max_total_tokens = settings.max_total_tokens or self.context_length
        if self.max_total_tokens > self.context_length:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) cannot exceed the context length ({self.context_length})"
            )
        self.max_input_tokens = settings.max_input_tokens or self.max_total_tokens - 1
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be less than max_total_tokens "
                f"({self.max_total_tokens}): a reply needs at least one token"
            )
        self.max_tokens_limit = min(settings.max_tokens_limit or self.context_length, self.context_length)
        self.vocab_size = _vocab_size(tm.model, tm.tokenizer)
        self.grammars = Grammars(tm.tokenizer, self.vocab_size)
        #: The model's tool-call format (`tools.py`); None: its template renders tools in a format not known here.
        self.tool_format = template_format(getattr(tm.tokenizer, "chat_template", None))
        #: The text of every special token: in user, system or tool content it is tokenized as text.
        self.special_texts = tuple(
            t.content for t in getattr(tm.tokenizer, "added_tokens_decoder", {}).values() if t.special
        ) or tuple(getattr(tm.tokenizer, "all_special_tokens", ()))
        self.model_name = settings.model_name
        self.created = int(time.time())
        self.fingerprint = f"torus-sparse-{__version__}"
        self.draining = False
        self._hurried = False  # a second Ctrl+C: the drain's grace ends now
        self._workers = ThreadPoolExecutor(PREPARE_THREADS, "torus-serve-prepare", initializer=_lower_priority)
        self._live: set[Handle] = set()

    # ------------------------------------------------------------------ requests
    async def prepare(self, request: Request, build: Callable[[bytes], T]) -> T:
        """Read the body (on the loop: it only moves bytes), then run `build(body)` in a worker
        thread: parsing, validation, chat template, tokenizing and limit checks. A body that is
        not declared `application/json` is refused first (415)."""
        require_json(request)
        body = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._workers, build, body)

    def close(self) -> None:
        """Let the worker threads go (those still preparing a request finish it first); stop the
        grammar sandbox."""
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.grammars.close()

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = (), fmt: str = FALLBACK
    ) -> list[int]:
        """Token ids of OpenAI chat `messages` through the chat template, with `tools` rendered in
        the model's tool format `fmt` (`tools.render_messages`). Text in user, system and tool
        content that spells a special token (`<|im_end|>`) stays text (`_encode_as_text`)."""
        from jinja2.exceptions import TemplateError

        from torus_adapters.transformers_adapter import PromptError

        for i, m in enumerate(messages):
            check_text(m.get("content") or "", f"messages[{i}].content")
        rendered = render_messages(messages, tools, fmt)
        native = fmt != FALLBACK and (tools or any(len(m) > 2 for m in rendered))
        guarded = [
            i
            for i, m in enumerate(rendered)
            if m["role"] != "assistant" and any(s in (m.get("content") or "") for s in self.special_texts)
        ]
        try:
            if guarded:
                return self._encode_as_text(rendered, tools, guarded)
            if not native:
                return self.tm.encode(rendered, chat=True)["input_ids"][0].tolist()
            enc = self.tm.tokenizer.apply_chat_template(
                rendered, tools=list(tools) or None, add_generation_prompt=True, return_dict=True
            )
            return list(enc["input_ids"])
        except ApiError:
            raise
        except PromptError as exc:
            raise bad_request(str(exc), "messages") from None
        except TemplateError as exc:  # the template's own words, e.g. "roles must alternate"
            raise bad_request(f"the model's chat template rejected these messages: {exc}", "messages") from None
        except Exception:
            ref = log_reference(log, "the chat template failed")
            raise bad_request(
                f"the model's chat template could not format these messages (reference {ref})", "messages"
            ) from None

    def _encode_as_text(
        self, rendered: list[dict[str, Any]], tools: Sequence[dict[str, Any]], guarded: list[int]
    ) -> list[int]:
        """Tokenize the templated prompt with the contents of `rendered[guarded]` as plain text: a
        user who writes `<|im_end|>` gets its characters, not the token that ends their turn.

        The template is rendered again with each guarded content replaced by a marker; the text
        between markers is the template's own (its special tokens stay special), the contents go in
        between, tokenized with `split_special_tokens`. If the template changed a content (trimmed
        it, say), the pieces do not add up to the real prompt and the request is refused: no guess."""
        tok = self.tm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions with a plain prompt", "messages")
        options = dict(tools=list(tools) or None, add_generation_prompt=True, tokenize=False)
        prompt = tok.apply_chat_template(rendered, **options)
        markers = {i: f"\ue000{i}\ue001" for i in guarded}
        skeleton = tok.apply_chat_template(
            [{**m, "content": markers[i]} if i in markers else m for i, m in enumerate(rendered)], **options
        )
        pieces: list[tuple[str, bool]] = []  # (text, is a guarded content)
        at = 0
        for i in guarded:
            found = skeleton.find(markers[i], at)
            if found < 0 or skeleton.count(markers[i]) != 1:
                pieces = []
                break
            pieces += [(skeleton[at:found], False), (rendered[i]["content"], True)]
            at = found + len(markers[i])
        pieces.append((skeleton[at:], False))
        if "".join(text for text, _ in pieces) != prompt:
            raise bad_request(
                "a message holds the text of one of the model's special tokens, and this model's chat template "
                "changes message text, so it cannot be kept apart from the template's own tokens; remove it",
                "messages",
            )
        ids: list[int] = []
        for text, content in pieces:
            if text:
                ids += tok(text, add_special_tokens=False, split_special_tokens=content)["input_ids"]
        return ids

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        ids = self.tm.encode(check_text(text, param), chat=False)["input_ids"][0].tolist()
        if not ids:
            raise bad_request(f"{param} must not be empty", param)
        return ids

    def max_new_tokens(
        self,
        prompt_len: int,
        requested: int | None,
        param: str = "max_tokens",
        default: int | None = None,
        prompt_param: str = "messages",
    ) -> int:
        """How many tokens this request may generate; `ApiError` when the prompt is over
        `max_input_tokens` or prompt + request over `max_total_tokens`.

        Without `requested`: `default` (else the server's), capped by the limit and the room left."""
        total, most = self.max_total_tokens, self.max_input_tokens
        if prompt_len > most:
            raise bad_request(
                f"{prompt_param} is {prompt_len} tokens but this server accepts at most {most} input tokens "
                f"(the model's context holds {self.context_length}); shorten it",
                prompt_param,
                "context_length_exceeded",
            )
        room = total - prompt_len
        if requested is None:
            return min(default or self.settings.default_max_tokens, room, self.max_tokens_limit)
        if requested > self.max_tokens_limit:
            raise bad_request(f"{param} is {requested} but this server allows at most {self.max_tokens_limit}", param)
        if requested > room:
            raise bad_request(
                f"this server allows {total} tokens per request, prompt and reply (the model's context holds "
                f"{self.context_length}); the prompt uses {prompt_len}, so {param} can be at most {room} "
                f"(got {requested})",
                param,
                "context_length_exceeded",
            )
        return requested

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's `logit_bias` as (token id, bias) pairs; keys must be token ids in decimal."""
        if not bias:
            return ()
        pairs = []
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < self.vocab_size):
                raise bad_request(
                    f"logit_bias keys must be token ids in decimal, from 0 to {self.vocab_size - 1}; got {key[:40]!r}",
                    "logit_bias",
                )
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    # ------------------------------------------------------------------ generation
    def start(self, request: GenerationRequest) -> Handle:
        if self.draining:
            raise shutting_down()
        try:
            handle = self.scheduler.submit(request)
        except Overloaded as exc:
            raise ApiError(429, f"model is overloaded: {exc}", code="overloaded") from None
        self._live = {h for h in self._live if not h.closed}
        self._live.add(handle)
        return handle

    def start_all(self, requests: Sequence[GenerationRequest]) -> list[Handle]:
        """Start several generations (a request's `n` choices); all or none: on 429 the started ones are cancelled."""
        handles: list[Handle] = []
        try:
            for request in requests:
                handles.append(self.start(request))
        except ApiError:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def complete(self, handle: Handle, request: Request) -> Completion:
        """Wait for the whole answer; cancel the generation if the client disconnects first."""
        return (await self.complete_all([handle], request))[0]

    async def complete_all(self, handles: Sequence[Handle], request: Request) -> list[Completion]:
        """Wait for every answer; cancel them all if the client disconnects first or one fails."""
        collect = asyncio.ensure_future(asyncio.gather(*(h.collect() for h in handles)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                raise ClientGone()
            try:
                return list(collect.result())
            except GenerationFailed as exc:
                raise failure(exc) from None
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                # A cancelled gather ends holding a CancelledError that asyncio logs, with a
                # traceback, as "never retrieved" once the future is collected: retrieve it.
                collect.add_done_callback(lambda f: f.cancelled() or f.exception())
            for handle in handles:
                handle.cancel()

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one service per process; ids are bounded by the vocabulary)
    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and its exact bytes (what OpenAI's logprobs report for it)."""
        if token_id in self.scheduler.special_ids:
            text = self.tm.tokenizer.decode([token_id])
            return text, text.encode("utf-8")
        raw = self.grammars.tokenizer.decode_bytes([token_id])
        return raw.decode("utf-8", errors="replace"), raw

    async def drain(self, grace: float) -> None:
        """Refuse new generations; give the running ones `grace` seconds, then end each with a
        "shutting down" error that its route sends in its client's format."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._open() and loop.time() < deadline and not self._hurried:
            await asyncio.sleep(0.05)
        left = self._open()
        if left and self._hurried:
            log.warning("shutting down: ending %d generation(s) now (second interrupt)", len(left))
        elif left:
            log.warning("shutting down: ending %d generation(s) still running after %.1f s", len(left), grace)
        for handle in left:
            handle.abort("the server is shutting down; this generation was stopped before it finished")

    def hurry(self) -> None:
        """End the drain's grace now (a second Ctrl+C): the generations still running get the
        shutting-down error at once."""
        self._hurried = True

    def _open(self) -> list[Handle]:
        return [h for h in self._live if not h.closed]


def _lower_priority() -> None:
    """Run this worker thread at a lower CPU priority than the server's (Linux: nice is per thread)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PREPARE_NICE))
    except (AttributeError, OSError):  # no per-thread priority here: the bound on threads still holds
        pass


def _vocab_size(model: Any, tokenizer: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
