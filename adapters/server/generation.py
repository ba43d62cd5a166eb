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

from .sampling import SamplingParams

#: Why a generation ended. The first three are normal ends; TGI spells them this way.
EOS, LENGTH, STOP = "eos_token", "length", "stop_sequence"
CANCELLED, ERROR = "cancelled", "error"


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    """One generated token. `text` is what it adds to the reply ("" for a special token's reply text)."""

    id: int
    text: str
    logprob: float
    special: bool

    @property
    def reply_text(self) -> str:
        return "" if self.special else self.text


@dataclass(frozen=True)
class Step:
    """One report from the scheduler: a token, an end, or both (the last token carries the end).

    stop_at: when finish_reason is "stop_sequence", where the stop string starts in the reply text.
    """

    token: Token | None
    finish_reason: str | None = None
    stop_at: int | None = None
    error: str | None = None


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
    """The model raised while generating this request (the server keeps serving)."""


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

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (no-op once it has finished)."""
        if not self.done:
            self._cancel.set()

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
            raise GenerationFailed(last.error or "generation failed")
        return Completion(
            tokens=tokens,
            finish_reason=last.finish_reason or CANCELLED,
            stop_at=last.stop_at,
            prompt_tokens=len(self.request.prompt_ids),
            seed=self.request.sampling.seed,
        )
