"""OpenAI answers from generations: choices (text or tool calls), logprobs, and the event streams.

A request with `n` choices runs `n` generations in the same decode batch; each is read here into
choice `index`, and streamed choices are interleaved as their tokens arrive (as OpenAI does). Stop
strings are held back and cut (`detok.HoldBack`); with tools, text that could begin a tool call is
held back too (`CallSplitter`) until the reply shows whether it is one: a call is sent as
`tool_calls` deltas (the first names id, type and function, the next carries the arguments) and
the choice ends with `finish_reason: "tool_calls"`; anything else is sent as content.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from .detok import HoldBack
from .errors import ApiError, openai_body
from .generation import CANCELLED, ERROR, LENGTH, Completion, Handle, Token
from .service import failure
from .sse import DONE, openai_event
from .tools import LLAMA3, MISTRAL, ToolCall, call_start, parse_calls

#: Special tokens that are part of a tool call's text (the reply text drops special tokens).
CALL_MARKERS = frozenset({"[TOOL_CALLS]", "[ARGS]", "<|python_tag|>"})

#: (token id) -> (text, bytes): `ModelService.token_piece`.
PieceOf = Callable[[int], tuple[str, bytes]]


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's reply is read for tool calls: the model's format, the tools it may call,
    and whether several calls may be returned."""

    fmt: str
    names: frozenset[str]
    parallel: bool = True

    def parse(self, text: str) -> tuple[str, list[ToolCall]] | None:
        parsed = parse_calls(text, self.fmt, self.names)
        if parsed is not None and not self.parallel:
            return parsed[0], parsed[1][:1]
        return parsed


def finish(reason: str) -> str:
    return "length" if reason == LENGTH else "stop"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_error(err: ApiError) -> str:
    """The event that ends a stream that failed: OpenAI's error object (the `openai` client raises it)."""
    return openai_event(openai_body(err.status, err.message, err.param, err.code))


def call_text(tokens: Sequence[Token]) -> str:
    """The reply as a tool-call parser reads it: the text, with the call markers that are special tokens."""
    return "".join(t.text if t.special and t.text in CALL_MARKERS else t.reply_text for t in tokens)


# ---------------------------------------------------------------------- logprobs
def chat_logprob(token: Token, piece: PieceOf, top: bool) -> dict[str, Any]:
    text, raw = piece(token.id)
    entry: dict[str, Any] = {"token": text, "logprob": token.logprob, "bytes": list(raw), "top_logprobs": []}
    if top:
        entry["top_logprobs"] = [
            {"token": piece(i)[0], "logprob": lp, "bytes": list(piece(i)[1])} for i, lp in token.top
        ]
    return entry


def completion_logprobs(tokens: Sequence[Token], piece: PieceOf, top: bool, offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs for `tokens`; `offset`: where their text starts in the choice's text."""
    texts, offsets = [], []
    for t in tokens:
        offsets.append(offset)
        texts.append(piece(t.id)[0])
        offset += len(t.reply_text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{piece(i)[0]: lp for i, lp in t.top} for t in tokens] if top else None,
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------- whole answers
def chat_choice(
    index: int, done: Completion, tools: ToolPlan | None, logprobs: bool, top: bool, piece: PieceOf
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": done.text_before_stop}
    reason = finish(done.finish_reason)
    if tools is not None and done.finish_reason != LENGTH:
        parsed = tools.parse(call_text(done.tokens) if tools.fmt == MISTRAL else done.text_before_stop)
        if parsed is not None:
            content, calls = parsed
            message = {"role": "assistant", "content": content or None, "tool_calls": [c.as_openai() for c in calls]}
            reason = "tool_calls"
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": [chat_logprob(t, piece, top) for t in done.tokens], "refusal": None}
        if logprobs
        else None,
        "finish_reason": reason,
    }


def completion_choice(index: int, done: Completion, echo: str, logprobs: int | None, piece: PieceOf) -> dict:
    return {
        "index": index,
        "text": echo + done.text_before_stop,
        "logprobs": completion_logprobs(done.tokens, piece, bool(logprobs), len(echo))
        if logprobs is not None
        else None,
        "finish_reason": finish(done.finish_reason),
    }


# ---------------------------------------------------------------------- streams
class _Reply:
    """Reads a generation's steps as (text to show, finish reason or None, the token), stop strings
    held back and cut."""

    def __init__(self, handle: Handle, stop: tuple[str, ...]) -> None:
        self.handle = handle
        self.hold = HoldBack(stop)
        self.tokens = 0
        self.error: ApiError | None = None

    async def pieces(self) -> AsyncIterator[tuple[str, str | None, Token]]:
        hold = self.hold
        async for step in self.handle.steps():
            if step.finish_reason in (CANCELLED, ERROR):
                self.error = failure(step) if step.finish_reason == ERROR else ApiError(500, "generation was cancelled")
                return
            assert step.token is not None
            self.tokens += 1
            token = step.token
            text = token.text if token.special and token.text in CALL_MARKERS else token.reply_text
            if step.finish_reason is None:
                yield hold.push(text), None, token
            elif step.stop_at is not None:
                yield hold.push(text, end=step.stop_at), step.finish_reason, token
            else:
                yield hold.push(text) + hold.finish(), step.finish_reason, token


class CallSplitter:
    """Streams content until text that may begin a tool call; holds everything from there on."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.marker = call_start(fmt)
        self.text = ""
        self.shown = 0
        self.in_call = False

    def push(self, piece: str) -> str:
        """Append text; return the content that can be shown now."""
        self.text += piece
        if self.in_call:
            return ""
        if self.fmt == LLAMA3:  # a call is the whole reply: decided by its first visible character
            stripped = self.text.lstrip()
            if not stripped:
                return ""
            if stripped.startswith(("{", "<|python_tag|>")):
                self.in_call = True
                return ""
            self.fmt, self.marker = "", "\0"  # plain content from here on
        at = self.text.find(self.marker, self.shown)
        if at >= 0:
            self.in_call = True
            return self._show(at)
        keep = next(
            (n for n in range(min(len(self.marker) - 1, len(self.text)), 0, -1) if self.text.endswith(self.marker[:n])),
            0,
        )
        return self._show(len(self.text) - keep)

    def _show(self, upto: int) -> str:
        out = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return out

    def rest(self) -> str:
        """What was held back and not shown (sent as content when it is not a call)."""
        return self._show(len(self.text))


async def chat_choice_events(
    index: int,
    handle: Handle,
    stop: tuple[str, ...],
    tools: ToolPlan | None,
    logprobs: bool,
    top: bool,
    piece: PieceOf,
) -> AsyncIterator[dict[str, Any] | ApiError | int]:
    """One choice of a streamed chat completion: its `choices[]` entries, then its token count (or the error)."""

    def entry(delta: dict, reason: str | None = None, lps: list | None = None) -> dict[str, Any]:
        return {
            "index": index,
            "delta": delta,
            "logprobs": {"content": lps, "refusal": None} if lps else None,
            "finish_reason": reason,
        }

    yield entry({"role": "assistant", "content": ""})  # as OpenAI: the role once, in the first chunk
    reply = _Reply(handle, stop)
    split = CallSplitter(tools.fmt) if tools is not None else None
    pending: list[dict[str, Any]] = []
    async for text, reason, token in reply.pieces():
        if logprobs:
            pending.append(chat_logprob(token, piece, top))
        if split is not None:
            text = split.push(text)
        if text:
            yield entry({"content": text}, lps=pending)
            pending = []
        if reason is None:
            continue
        final = finish(reason)
        if split is not None and split.in_call:
            parsed = tools.parse(split.text) if tools is not None and reason != LENGTH else None
            if parsed is None:
                text = split.rest()
                if text or pending:
                    yield entry({"content": text}, lps=pending)
            else:
                if pending:
                    yield entry({"content": ""}, lps=pending)
                for k, call in enumerate(parsed[1]):
                    first = {
                        "index": k,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                    yield entry({"tool_calls": [first]})
                    yield entry({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
                final = "tool_calls"
        elif pending:
            yield entry({"content": ""}, lps=pending)
        pending = []
        yield entry({}, final)
    if reply.error:
        yield reply.error
        return
    yield reply.tokens


async def completion_choice_events(
    index: int, handle: Handle, stop: tuple[str, ...], echo: str, logprobs: int | None, piece: PieceOf
) -> AsyncIterator[dict[str, Any] | ApiError | int]:
    """One choice of a streamed completion: its `choices[]` entries, then its token count (or the error)."""
    offset = len(echo)
    if echo:
        yield {"index": index, "text": echo, "logprobs": None, "finish_reason": None}
    reply = _Reply(handle, stop)
    pending: list[Token] = []
    async for text, reason, token in reply.pieces():
        pending.append(token)
        if not text and reason is None:
            continue
        lps = completion_logprobs(pending, piece, bool(logprobs), offset) if logprobs is not None else None
        offset += sum(len(t.reply_text) for t in pending)
        pending = []
        yield {"index": index, "text": text, "logprobs": lps, "finish_reason": finish(reason) if reason else None}
    if reply.error:
        yield reply.error
        return
    yield reply.tokens


async def merged_events(
    head: dict[str, Any], choices: Sequence[AsyncIterator[Any]], prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Interleave the choices' entries into chunks as they come; end with usage (if asked) and [DONE].
    The first choice that fails ends the stream with OpenAI's error event."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    ended = object()

    async def pump(events: AsyncIterator[Any]) -> None:
        try:
            async for item in events:
                await queue.put(item)
        finally:
            await queue.put(ended)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    left, tokens = len(tasks), 0
    try:
        while left:
            item = await queue.get()
            if item is ended:
                left -= 1
            elif isinstance(item, ApiError):
                yield stream_error(item)
                yield DONE
                return
            elif isinstance(item, int):
                tokens += item
            else:
                yield openai_event({**head, "choices": [item]})
        if include_usage:
            yield openai_event({**head, "choices": [], "usage": usage(prompt_tokens, tokens)})
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
