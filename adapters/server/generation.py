"""What the routes hand the scheduler, what comes back, and the asyncio side of one request.

The scheduler thread reports each step of a request through `Handle.deliver` (thread-safe); the
route reads them with `async for step in handle.steps()` or `await handle.collect()`. Leaving
either early (client gone, error) must end with `handle.cancel()`, which the scheduler honours
before its next decode step.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from .constraints import Constraint
from .sampling import SamplingParams

#: Why a generation ended. The first three are normal ends; TGI spells them this way.
EOS, LENGTH, STOP = "eos_token", "length", "stop_sequence"
CANCELLED, ERROR = "cancelled", "error"
#: What made a generation end in ERROR (`Step.cause`): the model raised, the server is shutting
#: down, or the request's grammar could not go on. Routes answer the first with 500 (TGI 424
#: "generation"), the second with 503 ("overloaded"), the third with 400 (TGI 422 "validation").
MODEL_FAILED, SHUTTING_DOWN, GRAMMAR_FAILED = "model_failed", "shutting_down", "grammar_failed"


@dataclass(frozen=True)
class GenerationRequest:
    """What the scheduler runs. `constraint`: the grammar the reply must match (a fresh matcher,
    built in the prepare thread; one per request). `top_logprobs`: alternatives reported per token."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = field(default=None, compare=False)
    top_logprobs: int = 0


@dataclass(frozen=True)
class Token:
    """One generated token. `text` is what it adds to the reply ("" for a special token's reply text).
    `logprob` and `top` ((id, logprob) alternatives) are from the distribution it was drawn from."""

    id: int
    text: str
    logprob: float
    special: bool
    top: tuple[tuple[int, float], ...] = ()

    @property
    def reply_text(self) -> str:
        return "" if self.special else self.text


@dataclass(frozen=True)
class Step:
    """One report from the scheduler: a token, an end, or both (the last token carries the end).

    stop_at: when finish_reason is "stop_sequence", where the stop string starts in the reply text.
    error / cause: when finish_reason is "error", a message fit for the client (never an exception's
    text: that goes to the server log) and `MODEL_FAILED` or `SHUTTING_DOWN`.
    """

    token: Token | None
    finish_reason: str | None = None
    stop_at: int | None = None
    error: str | None = None
    cause: str | None = None


@dataclass
class Completion:
    """A whole generation, collected."""

    tokens: list[Token]
    finish_reason: str
    stop_at: int | None
    prompt_tokens: int
    seed: int | None

    @property
    def text(self) -> str:
        """The reply, stop string and all (what TGI returns)."""
        return "".join(t.reply_text for t in self.tokens)

    @property
    def text_before_stop(self) -> str:
        """The reply cut where a stop string starts (what OpenAI returns)."""
        text = self.text
        return text if self.stop_at is None else text[: self.stop_at]


class GenerationFailed(Exception):
    """The generation ended in an error: the model raised, or the server is shutting down."""

    def __init__(self, message: str, cause: str | None = MODEL_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause or MODEL_FAILED


class Handle:
    """The route's end of one request in flight."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Step] = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def closed(self) -> bool:
        """Finished or cancelled: nobody will read further steps."""
        return self.done or self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (no-op once it has finished)."""
        if not self.done:
            self._cancel.set()

    def abort(self, message: str, cause: str = SHUTTING_DOWN) -> None:
        """End the generation now with an error step (call on the handle's event loop); the
        scheduler drops the request before its next decode step."""
        if self.closed:
            return
        self._cancel.set()
        self._queue.put_nowait(Step(None, ERROR, error=message, cause=cause))

    def deliver(self, step: Step) -> None:
        """Called from the scheduler thread. Raises RuntimeError if the event loop has closed."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, step)

    async def steps(self):
        """Yield steps until the one that ends the generation (included)."""
        while not self.done:
            step = await self._queue.get()
            if step.finish_reason is not None:
                self.done = True
            yield step

    async def collect(self) -> Completion:
        """Wait for the whole generation; raise `GenerationFailed` if the model failed."""
        tokens: list[Token] = []
        last = Step(None)
        async for last in self.steps():
            if last.token is not None:
                tokens.append(last.token)
        if last.finish_reason == ERROR:
            raise GenerationFailed(last.error or "generation failed", last.cause)
        return Completion(
            tokens=tokens,
            finish_reason=last.finish_reason or CANCELLED,
            stop_at=last.stop_at,
            prompt_tokens=len(self.request.prompt_ids),
            seed=self.request.sampling.seed,
        )
