"""One thread owns the model and decodes every request in flight together, one token per step.

Design (the simplest that batches and stays exact):

- A request is prefilled alone (batch 1, no padding), which gives its first token, then joins the
  decode batch (`kvbatch.BatchCache`). A prompt of up to `ONE_PASS` (128) tokens, or
  `prefill_chunk` when set, is prefilled in one forward pass, the one `generate()` makes.
- A longer prompt is prefilled in chunks, interleaved with the decode steps of the requests in
  flight: each turn of the loop runs prefill chunks and then one decode step, and aims to take
  `prefill_slice` seconds in all (the prefill gets what the last decode step left, at least a
  quarter; four slices when nothing is decoding: `_prefill_budget`), so a long prompt never
  freezes the other streams: the gap between two of their tokens is about one slice. Chunks are
  sized from the time the last chunk of that prompt took per token, or are `prefill_chunk` tokens
  when set (then boundaries, and so the floating-point rounding of a long prompt, do not depend
  on load).
  A chunk's cost is its tokens times the context they attend to: chunks after the first attend
  through `chunk_attention`, which does not copy the whole cache per layer as transformers' masked
  SDPA path does (that copy made a 16-token chunk cost as much as a 300-token one at 8k tokens).
  Prefills go shortest-remaining first, so a short request is not queued behind a long prompt. A
  request cancelled while it is prefilled (its client left) stops at its next chunk.
- Each decode step runs the model once on one new token per row. The engine's FFN hooks fire once
  per forward pass, so one weight stream serves every request in the batch.
- Padding is masked and positions count only a row's own tokens, so each row computes what it
  would alone: a greedy request gives its own greedy output whatever else is in flight (up to
  floating-point rounding of batched kernels, which the tests check does not change the tokens).
- New requests are admitted between decode steps, up to `max_batch_size` rows; the rest wait.
- A request whose handle was cancelled (its client went away) is dropped before the next step.
- `max_pending` bounds the requests in flight: every accepted request counts from `submit` until
  it ends, also while it is being prefilled (neither waiting nor in the batch yet).
- When the model raises, the requests it was computing end with a message that names no
  exception (clients must not see internals); the traceback goes to the log with a reference
  that the message repeats.
- Each row samples with its own parameters, generator and grammar (`sampling.py`,
  `constraints.py`: a constrained row ends when its grammar is complete); stop strings and
  incremental detokenization run here (`detok.py`), so a request ends at the step that completes it.

Models whose cache cannot be padded (sliding-window or linear-attention layers) run one request
at a time through the same loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .chunk_attention import chunk_attention, sdpa_configs
from .counters import SchedulerCounters
from .detok import IncrementalDecoder, StopMatcher
from .errors import log_reference
from .generation import (
    CANCELLED,
    EOS,
    ERROR,
    GRAMMAR_FAILED,
    LENGTH,
    MODEL_FAILED,
    SHUTTING_DOWN,
    STOP,
    GenerationRequest,
    Handle,
    Step,
    Token,
)
from .kvbatch import BatchCache, batchable, prefill_cache
from .sampling import Choice, RowSampler, choose_tokens

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests are already waiting or running."""


@dataclass
class _Seq:
    handle: Handle
    sampler: RowSampler
    decoder: IncrementalDecoder
    stops: StopMatcher
    generated: int = 0
    next_token: int = -1  # chosen but not yet in the cache


#: Prompts up to this many tokens are prefilled in one pass (as `generate()` does), whatever else runs.
ONE_PASS = 128
#: Seconds one turn of the loop (prefill chunks, then a decode step) aims at while requests decode.
PREFILL_SLICE_S = 0.5
#: The smallest chunk of a prompt prefilled in several (smaller ones cost more in per-pass overhead).
MIN_CHUNK = 8


@dataclass
class _Prefill:
    """A request being prefilled: its sequence state, its prompt, how far it has got."""

    seq: _Seq
    ids: torch.Tensor  # [1, prompt length]
    done: int = 0
    cache: Any = None
    rate: float | None = None  # seconds per token to size its next chunk by (the slower of its last two)
    measured: float | None = None  # seconds per token of its last chunk
    started: float = field(default_factory=time.perf_counter)

    @property
    def left(self) -> int:
        return self.ids.shape[1] - self.done


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


class Scheduler:
    """Runs generation requests for one model in a background thread, batching decode steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        max_batch_size: int = 8,
        max_pending: int = 64,
        prefill_chunk: int | None = None,
        prefill_slice: float = PREFILL_SLICE_S,
    ):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.prefill_slice = prefill_slice
        self.tokenizer = tokenizer
        self.device = device
        self.batchable = batchable(model.config)
        self._sdpa_configs = sdpa_configs(model)  # switched to `chunk_sdpa` for later prefill chunks
        self.max_batch_size = max_batch_size if self.batchable else 1
        self.max_pending = max_pending
        self.counters = SchedulerCounters()
        self._eos = _eos_ids(model, tokenizer)
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.special_ids = self._special
        self._waiting: collections.deque[Handle] = collections.deque()
        self._active: list[_Seq] = []
        self._prefilling: list[_Prefill] = []
        self._rate: float | None = None  # seconds per token of the last first chunk of a prompt
        self._decode_times: collections.deque[float] = collections.deque(maxlen=8)  # of the last decode steps
        self._batch = BatchCache()
        self._in_flight = 0  # accepted and not ended: waiting, being prefilled, or decoding
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="torus-serve-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def for_model(cls, tm: Any, **kwargs: Any) -> "Scheduler":
        """A scheduler for a `TorusModel` (uses its model, tokenizer and the engine's device)."""
        return cls(tm.model, tm.tokenizer, tm.engine.device, **kwargs)

    # ------------------------------------------------------------------ public
    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request; call from the event loop that will read the handle. Raises `Overloaded`."""
        if not request.sampling.greedy and request.sampling.seed is None:
            request = replace(request, sampling=replace(request.sampling, seed=secrets.randbits(63)))
        handle = Handle(request, asyncio.get_running_loop())
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._in_flight >= self.max_pending:
                raise Overloaded(f"{self.max_pending} requests are already in flight; retry later")
            self._in_flight += 1
            self._waiting.append(handle)
            self.counters.waiting = len(self._waiting)
            self._cv.notify()
        return handle

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet ended (what `max_pending` bounds)."""
        return self._in_flight

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight end with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active and not self._prefilling:
                    self._cv.wait()
                if self._closed:
                    break
                admit = []
                room = self.max_batch_size - len(self._active) - len(self._prefilling)
                while self._waiting and len(admit) < room:
                    admit.append(self._waiting.popleft())
                self.counters.waiting = len(self._waiting)
            self._drop_cancelled()
            for handle in admit:
                try:
                    self._admit(handle)
                except Exception:
                    self._finish_quietly(handle, ERROR, _logged_failure("admitting a request failed"))
            self._prefill_slice()
            try:
                if self._active:
                    began = time.perf_counter()
                    self._decode_step()
                    self._decode_times.append(time.perf_counter() - began)
            except Exception:  # a model failure ends the requests in flight, not the server
                self._fail_all(_logged_failure("decode step failed"))
        self._fail_all("the server is shutting down", waiting=True, cause=SHUTTING_DOWN)

    def _admit(self, handle: Handle) -> None:
        """Set up a request's sampling state and queue it for prefill."""
        if handle.cancelled:
            self._finish_quietly(handle, CANCELLED)
            return
        req = handle.request
        seq = _Seq(
            handle=handle,
            sampler=RowSampler(req.sampling, req.prompt_ids, self.device, req.constraint, req.top_logprobs),
            decoder=IncrementalDecoder(self.tokenizer),
            stops=StopMatcher(req.stop),
        )
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        self._prefilling.append(_Prefill(seq, ids))

    def _prefill_slice(self) -> None:
        """Prefill for what the turn leaves after a decode step (always at least one chunk):
        shortest remaining prompt first, each chunk sized to the time left; a further chunk only
        when it is expected to fit (the smallest chunk can take longer than what is left)."""
        start, budget = time.perf_counter(), self._prefill_budget()
        ran = False
        while self._prefilling:
            time_left = budget - (time.perf_counter() - start)
            if ran and time_left < budget / 4:  # too little left for a chunk worth its pass
                return
            item = min(self._prefilling, key=lambda p: p.left)
            if item.seq.handle.cancelled:  # its client left: stop at this chunk
                self._prefilling.remove(item)
                self._finish_quietly(item.seq.handle, CANCELLED)
                continue
            n, rate = self._chunk_size(item, time_left), item.rate or self._rate
            if ran and rate is not None and n * rate > time_left:  # even this chunk would overrun the turn
                return
            try:
                self._prefill_chunk(item, n)
            except Exception:  # this request fails; the batch in flight is untouched
                self._prefilling.remove(item)
                self._finish_quietly(item.seq.handle, ERROR, _logged_failure("prefill failed"))
            ran = True

    def _prefill_budget(self) -> float:
        """Seconds of prefill this turn: what the slice leaves after a decode step (the median of
        the last few; at least a quarter of the slice); four slices when nothing decodes, or when
        even the fastest of the last decode steps outlasts the slice (a forward pass costs more than
        the turn, as with weights streamed to a GPU: the slice cannot be held, and shrinking chunks
        toward `MIN_CHUNK` would only multiply passes). One slow step on a busy CPU is not that."""
        if not self._active:
            return self.prefill_slice * 4
        recent = sorted(self._decode_times) or [0.0]
        if recent[0] >= self.prefill_slice:
            return self.prefill_slice * 4
        return max(self.prefill_slice - recent[len(recent) // 2], self.prefill_slice / 4)

    def _chunk_size(self, item: _Prefill, time_left: float) -> int:
        """Tokens of `item`'s prompt to prefill now."""
        if self.prefill_chunk is not None:
            return min(item.left, self.prefill_chunk)
        if item.done == 0 and item.left <= ONE_PASS:
            return item.left
        rate = item.rate or self._rate
        n = 4 * MIN_CHUNK if rate is None else int(time_left / (rate * 1.1))  # a small first chunk measures
        n = max(MIN_CHUNK, n)
        return item.left if item.left - n < MIN_CHUNK else n

    def _prefill_chunk(self, item: _Prefill, n: int) -> None:
        """Run the next `n` prompt tokens of `item`; at the prompt's end, choose its first token and
        move it to the decode batch (unless that token ends it)."""
        seq, req = item.seq, item.seq.handle.request
        ids = item.ids[:, item.done : item.done + n]
        if item.cache is None and n < item.left and self.batchable:
            item.cache = prefill_cache(self.model.config, item.ids.shape[1])
        began = time.perf_counter()
        with torch.inference_mode(), chunk_attention(self._sdpa_configs if item.done else []):
            out = self.model(
                input_ids=ids,
                attention_mask=torch.ones(1, item.done + n, dtype=torch.long, device=self.device),
                cache=item.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        rate = (time.perf_counter() - began) / n
        if item.done == 0 and n >= MIN_CHUNK:
            self._rate = rate
        item.rate = rate if item.measured is None else max(rate, item.measured)  # one quick chunk is no promise
        item.measured, item.cache, item.done = rate, out.cache, item.done + n
        self.counters.prefill_chunks += 1
        if item.left:
            return
        self._prefilling.remove(item)
        (choice,) = choose_tokens(out.logits[:, -1, :], [seq.sampler])
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(req.prompt_ids)
        if self._emit(seq, choice):
            return
        self._batch.add(item.cache, len(req.prompt_ids))
        self._active.append(seq)
        self.counters.running = len(self._active)

    def _decode_step(self) -> None:
        mask, positions = self._batch.step_inputs()
        ids = torch.tensor([[s.next_token] for s in self._active], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=self._batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._batch.advance(out.cache, mask)
        self.counters.decode_steps += 1
        self.counters.batch_size = len(self._active)
        choices = choose_tokens(out.logits[:, -1, :], [s.sampler for s in self._active])
        done = [i for i, (s, c) in enumerate(zip(self._active, choices)) if self._emit(s, c)]
        self._remove(done)

    def _emit(self, seq: _Seq, choice: Choice) -> bool:
        """Report one token; return True when it ends the request."""
        if seq.sampler.failure is not None:  # its grammar could not go on: this request ends, the batch goes on
            log.warning("a constrained generation stopped: %s", seq.sampler.failure)
            reason = (seq.sampler.failure.strip().splitlines() or [""])[0][:200].rstrip(".")
            message = "the reply's grammar could not go on" + (f" ({reason})" if reason else "")
            self._finish_quietly(seq.handle, ERROR, message, GRAMMAR_FAILED)
            return True
        token_id = choice.id
        seq.generated += 1
        seq.next_token = token_id
        self.counters.tokens_generated(1)
        special = token_id in self._special
        if special:
            text, stop_at = self.tokenizer.decode([token_id]), None
        else:
            text = seq.decoder.push(token_id)
            stop_at = seq.stops.push(text)
        constraint = seq.sampler.constraint
        if token_id in self._eos or (constraint is not None and constraint.done):  # the grammar is complete
            reason = EOS
        elif stop_at is not None:
            reason = STOP
        elif seq.generated >= seq.handle.request.max_new_tokens:
            reason = LENGTH
        else:
            reason = None
        step = Step(Token(token_id, text, choice.logprob, special, choice.top), reason, stop_at)
        try:
            seq.handle.deliver(step)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            seq.handle.cancel()
            return False
        if reason is not None:
            self._ended(reason)
            return True
        return False

    def _drop_cancelled(self) -> None:
        for item in [p for p in self._prefilling if p.seq.handle.cancelled]:
            self._prefilling.remove(item)
            self._finish_quietly(item.seq.handle, CANCELLED)
        gone = [i for i, s in enumerate(self._active) if s.handle.cancelled]
        for i in gone:
            self._finish_quietly(self._active[i].handle, CANCELLED)
        self._remove(gone)

    def _remove(self, rows: list[int]) -> None:
        if rows:
            keep = set(range(len(self._active))) - set(rows)
            self._active = [s for i, s in enumerate(self._active) if i in keep]
            self._batch.remove(rows)
        self.counters.running = len(self._active)

    def _ended(self, reason: str) -> None:
        """Every request ends exactly once, here: a finish, a cancel or an error."""
        self.counters.finished[reason] += 1
        with self._cv:
            self._in_flight -= 1

    def _finish_quietly(self, handle: Handle, reason: str, error: str | None = None, cause: str = MODEL_FAILED) -> None:
        self._ended(reason)
        try:
            handle.deliver(Step(None, reason, error=error, cause=cause if reason == ERROR else None))
        except RuntimeError:
            pass

    def _fail_all(self, message: str, waiting: bool = False, cause: str = MODEL_FAILED) -> None:
        for seq in self._active + [p.seq for p in self._prefilling]:
            self._finish_quietly(seq.handle, ERROR, message, cause)
        self._active, self._prefilling = [], []
        self._batch.clear()
        self.counters.running = 0
        if waiting:
            with self._cv:
                pending, self._waiting = list(self._waiting), collections.deque()
                self.counters.waiting = 0
            for handle in pending:
                self._finish_quietly(handle, ERROR, message, cause)


def _logged_failure(what: str) -> str:
    """Log the exception being handled under a reference; return the client's message."""
    ref = log_reference(log, what)
    return f"generation failed on the server (reference {ref}; the server log has the details)"
