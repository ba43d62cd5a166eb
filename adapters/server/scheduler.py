"""One thread owns the model and decodes every request in flight together, one token per step.

Design (the simplest that batches and stays exact):

- A request is prefilled alone (batch 1, no padding: the same forward pass `generate()` makes),
  which gives its first token, then joins the decode batch (`kvbatch.BatchCache`).
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
from dataclasses import dataclass, replace
from typing import Any

import torch

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
from .kvbatch import BatchCache, batchable
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
        self, model: Any, tokenizer: Any, device: torch.device, *, max_batch_size: int = 8, max_pending: int = 64
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batchable = batchable(model.config)
        self.max_batch_size = max_batch_size if self.batchable else 1
        self.max_pending = max_pending
        self.counters = SchedulerCounters()
        self._eos = _eos_ids(model, tokenizer)
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.special_ids = self._special
        self._waiting: collections.deque[Handle] = collections.deque()
        self._active: list[_Seq] = []
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
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    break
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.max_batch_size:
                    admit.append(self._waiting.popleft())
                self.counters.waiting = len(self._waiting)
            self._drop_cancelled()
            for handle in admit:
                try:
                    self._admit(handle)
                except Exception:
                    self._finish_quietly(handle, ERROR, _logged_failure("admitting a request failed"))
            try:
                if self._active:
                    self._decode_step()
            except Exception:  # a model failure ends the requests in flight, not the server
                self._fail_all(_logged_failure("decode step failed"))
        self._fail_all("the server is shutting down", waiting=True, cause=SHUTTING_DOWN)

    def _admit(self, handle: Handle) -> None:
        """Prefill one request alone; it then joins the decode batch unless its first token ends it."""
        if handle.cancelled:
            self._finish_quietly(handle, CANCELLED)
            return
        req = handle.request
        try:
            seq = _Seq(
                handle=handle,
                sampler=RowSampler(req.sampling, req.prompt_ids, self.device, req.constraint, req.top_logprobs),
                decoder=IncrementalDecoder(self.tokenizer),
                stops=StopMatcher(req.stop),
            )
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            (choice,) = choose_tokens(out.logits[:, -1, :], [seq.sampler])
        except Exception:  # this request fails; the batch in flight is untouched
            self._finish_quietly(handle, ERROR, _logged_failure("prefill failed"))
            return
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(req.prompt_ids)
        if self._emit(seq, choice):
            return
        self._batch.add(out.cache, len(req.prompt_ids))
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
        for seq in self._active:
            self._finish_quietly(seq.handle, ERROR, message, cause)
        self._active = []
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
