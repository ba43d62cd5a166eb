"""One loaded model for an interactive demo: chat turns, live per-reply stats, and re-attaching
the engine with new settings without breaking a reply in flight.

No UI code here: `gradio_ui` draws what this module measures.

Live numbers are read while the engine generates on another thread, so they come from
`peek()`, which only reads the engine's counters (plain numbers) and never settles or resets
anything; the full `EngineStats` snapshot is taken when no generation is running.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from torus_plugins import EngineStats, TorusConfig, attach
from torus_plugins.engine import Engine

from ..transformers_adapter import TorusModel

MiB = 2**20

Progress = Callable[[int, int], None]


def default_transport() -> str:
    """What the demo streams with: the CUDA copy stream on a GPU; on the CPU the "copy" worker
    (the CPU twin of the CUDA path), because the CPU's automatic zero-copy moves no bytes."""
    return "auto" if torch.cuda.is_available() else "copy"


@dataclass(frozen=True)
class Counters:
    """The engine's running totals at one moment (or the difference between two moments)."""

    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0

    @classmethod
    def peek(cls, engine: Engine) -> "Counters":
        """Read the per-layer counters without touching the engine: safe while it generates."""
        cs = list(engine.streamer.counters)
        return cls(
            hits=sum(c.hits for c in cs),
            misses=sum(c.misses for c in cs),
            bytes_moved=sum(c.bytes_moved for c in cs),
            stall_s=sum(c.stall_s for c in cs),
        )

    @classmethod
    def of(cls, stats: EngineStats) -> "Counters":
        return cls(stats.hits, stats.misses, stats.bytes_moved, stats.stall_s)

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(
            self.hits - other.hits,
            self.misses - other.misses,
            self.bytes_moved - other.bytes_moved,
            self.stall_s - other.stall_s,
        )

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


class _TokenClock:
    """A stopping criterion that never stops generation: it timestamps each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class ReplyStats:
    """How the reply in progress (or just finished) went."""

    tokens: int
    first_token_s: float | None  # request → first token (prefill included)
    decode_tok_s: float | None  # tokens after the first, per second
    counters: Counters  # what the engine did for this reply alone

    def as_dict(self) -> dict[str, Any]:
        c = self.counters
        return {
            "tokens": self.tokens,
            "first_token_s": self.first_token_s,
            "decode_tok_s": self.decode_tok_s,
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate,
            "bytes_streamed": c.bytes_moved,
            "stall_s": c.stall_s,
        }


@dataclass
class _ReplyMeter:
    engine: Engine
    start: float = field(default_factory=time.perf_counter)
    clock: _TokenClock = field(default_factory=_TokenClock)
    base: Counters = field(init=False)

    def __post_init__(self) -> None:
        self.base = Counters.peek(self.engine)

    def read(self, final: Counters | None = None) -> ReplyStats:
        times = list(self.clock.times)
        n = len(times)
        decode = (n - 1) / (times[-1] - times[0]) if n >= 2 and times[-1] > times[0] else None
        now = final if final is not None else Counters.peek(self.engine)
        return ReplyStats(n, times[0] - self.start if times else None, decode, now - self.base)


@dataclass(frozen=True)
class BudgetRange:
    """Budgets worth offering for this model: `minimum` holds only the non-FFN weights, the KV
    reserve and the smallest ring (everything streams); `full` keeps every FFN layer resident."""

    minimum: int
    full: int


def budget_range(model: str | os.PathLike[str] | None, config: TorusConfig) -> BudgetRange:
    """Ask the planner (shapes only, no weights read) for the useful range of `vram_budget`."""
    from ..transformers_adapter.planning import plan_model

    probe = config.replace(vram_budget=1, resident_layers=None)  # the minimum at the configured lookahead
    plan = plan_model(model, probe, bandwidth="16GB/s")  # bandwidth only feeds the speed estimate
    full = plan.non_ffn_bytes + plan.ffn_bytes + plan.kv_reserve_bytes
    return BudgetRange(minimum=plan.minimum_budget_bytes or 0, full=full)


def to_messages(history: Sequence[dict[str, Any]], message: str) -> list[dict[str, str]]:
    """Chat history as the UI keeps it (content as a string or a list of text parts) plus the new
    user message, as the plain `{"role", "content"}` list the model's chat template takes."""

    def text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, dict):
            return str(content.get("text") or "")
        if isinstance(content, (list, tuple)):
            return "".join(text(c) for c in content)
        return ""

    out = [
        {"role": m["role"], "content": text(m.get("content"))}
        for m in history
        if m.get("role") in ("user", "assistant", "system")
    ]
    return out + [{"role": "user", "content": message}]


class DemoSession:
    """A `TorusModel` shared by every visitor of the demo.

    One lock serialises replies and re-attaching: `reconfigure` waits for the reply in flight to
    finish, and a reply asked for during a reconfigure waits for the new engine.
    """

    def __init__(self, tm: TorusModel) -> None:
        self.tm = tm
        self._lock = threading.Lock()
        self._engine = tm.engine  # still readable while `reconfigure` has the model detached
        self._placement = tm.stats()  # refreshed whenever no generation runs
        # finished replies since the engine was attached: tokens, decode steps and their seconds
        self._tokens = self._decode_steps = 0
        self._decode_s = 0.0

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None, config: TorusConfig) -> "DemoSession":
        return cls(TorusModel.from_pretrained(model, config, show_progress=False))

    @property
    def config(self) -> TorusConfig:
        return self._engine.config

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # ------------------------------------------------------------------ stats
    def placement(self) -> EngineStats:
        """The latest full snapshot (placement never changes while a reply runs)."""
        if self._lock.acquire(blocking=False):
            try:
                self._placement = self.tm.stats()
            finally:
                self._lock.release()
        return self._placement

    def totals(self) -> Counters:
        """Counters since the engine was attached, safe to read at any time."""
        return Counters.peek(self._engine)

    def generated(self) -> tuple[int, float | None]:
        """(tokens of the replies finished since attach, their decode tok/s overall, None before
        any reply had two tokens): the "since attach" column's tokens and speed."""
        speed = self._decode_steps / self._decode_s if self._decode_s > 0 else None
        return self._tokens, speed

    # ------------------------------------------------------------------ chat
    def reply(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 128) -> Iterator[tuple[str, ReplyStats]]:
        """Yield (reply so far, stats so far) as text arrives; the last item has the final stats.

        Closing the iterator early cancels the generation and releases the model.
        """
        with self._lock:
            tm = self.tm
            meter = _ReplyMeter(tm.engine)
            text = ""
            pieces = tm.stream_generate(list(messages), max_new_tokens=max_new_tokens, stopping_criteria=[meter.clock])
            with contextlib.closing(pieces):
                for piece in pieces:
                    text += piece
                    yield text, meter.read()
            self._placement = tm.stats()
            final = meter.read(Counters.of(self._placement))
            self._tokens += final.tokens
            if final.decode_tok_s:
                self._decode_steps += final.tokens - 1
                self._decode_s += (final.tokens - 1) / final.decode_tok_s
        yield text, final

    # ------------------------------------------------------------------ settings
    def reconfigure(
        self,
        config: TorusConfig,
        progress: Progress | None = None,
        waiting: Callable[[], None] | None = None,
    ) -> EngineStats:
        """Re-attach the engine with `config` (same weights, new placement and transport).

        waiting: called every 0.2 s while a reply in flight holds the model.
        progress: `progress(done, total)` as FFN layers are packed.
        On an error (a budget too small, a transport this machine lacks) the previous engine is
        restored and the error raised (a `TorusError` for anything the user can fix).
        """
        while not self._lock.acquire(timeout=0.2):
            if waiting is not None:
                waiting()
        try:
            tokenizer, previous = self.tm.tokenizer, self.tm.config
            model = self.tm.detach()
            try:
                attach(model, config, progress=progress)
            except Exception:
                attach(model, previous)  # worked a moment ago
                raise
            finally:
                self.tm = TorusModel(model, tokenizer)
                self._engine = self.tm.engine
                self._placement = self.tm.stats()
                self._tokens = self._decode_steps = 0  # a new engine: "since attach" starts over
                self._decode_s = 0.0
            return self._placement
        finally:
            self._lock.release()
