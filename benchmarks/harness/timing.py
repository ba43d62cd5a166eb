"""Timing: the step clock inside `generate()`, one timed greedy generation, medians, rounds, the guard."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from .device import sync

T = TypeVar("T")


class StepClock:
    """A logits processor that timestamps each new token and changes nothing.

    `generate()` calls it once per new token, right after the forward pass that produced that
    token's logits: call 0 follows the prefill, calls 1..N-1 one decode step each. On CUDA it first
    waits for the *compute* stream (not the device, so an engine's copy stream keeps running across
    token boundaries); `generate()` already waits for that stream once per token (its stopping
    check reads a device tensor), so this adds no new synchronisation."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.times: list[float] = []
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.current_stream(device).synchronize())
            if device is not None and device.type == "cuda"
            else (lambda: None)
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._sync()
        self.times.append(time.perf_counter())
        return scores


@dataclass
class Generation:
    """One timed greedy generation: the new tokens and the clock readings around and inside it."""

    tokens: list[int]
    t_enter: float  # entry into generate()
    times: list[float]  # StepClock readings, one per new token
    t_exit: float  # generate() returned (after a device sync)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def prefill_s(self) -> float:
        return self.times[0] - self.t_enter

    @property
    def decode_s(self) -> float:
        return self.times[-1] - self.times[0]

    def ms(self) -> dict[str, Any]:
        """The CPU scripts' figures: decode ms/token = (t[N-1] - t[0]) / (N-1), prefill excluded."""
        return {
            "tokens": self.tokens,
            "prefill_ms": self.prefill_s * 1e3,
            "decode_ms_per_token": self.decode_s * 1e3 / self.steps,
            "total_ms": (self.t_exit - self.t_enter) * 1e3,
        }

    def rates(self) -> dict[str, Any]:
        """The GPU check's figures: tok/s = steps / (t[steps] - t[0]), prefill excluded."""
        return {
            "tokens": self.tokens,
            "decode_steps": self.steps,
            "decode_s": self.decode_s,
            "tok_per_s": self.steps / self.decode_s,
            "ms_per_token": self.decode_s * 1e3 / self.steps,
            "prefill_s": self.prefill_s,
            "generate_wall_s": self.t_exit - self.t_enter,
        }


def timed_generate(
    model: Any,
    inputs: dict[str, torch.Tensor],
    n: int,
    pad_token_id: int | None = None,
    device: torch.device | None = None,
) -> Generation:
    """Greedy, batch 1, KV cache, exactly `n` new tokens (`min_new_tokens == max_new_tokens`, so
    every variant decodes the same count), under inference mode, timed by a `StepClock`."""
    from transformers import LogitsProcessorList

    if n < 2:
        raise ValueError(f"n must be >= 2 (decode time is measured between the first and last token), got {n}")
    clock = StepClock(device)
    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    dev = device or torch.device("cpu")
    with torch.inference_mode():
        sync(dev)
        t_enter = time.perf_counter()
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **kw)
        sync(dev)
        t_exit = time.perf_counter()
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    if len(new) != n or len(clock.times) != n:
        raise RuntimeError(f"expected {n} new tokens and {n} timestamps, got {len(new)} and {len(clock.times)}")
    return Generation(new, t_enter, clock.times, t_exit)


def generate_once(model: Any, inputs: dict[str, torch.Tensor], n: int, pad_token_id: int | None) -> dict[str, Any]:
    """`timed_generate` on the CPU, in milliseconds (`Generation.ms`)."""
    return timed_generate(model, inputs, n, pad_token_id).ms()


def median(xs: Iterable[float | None]) -> float:
    """Median of the values that are not None; NaN when there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else float("nan")


def rotated(items: Sequence[T], r: int) -> list[T]:
    """`items` started at position r (mod len): round r's order, so no variant always runs first."""
    k = r % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


class TimeGuard:
    """Skips work whose predicted duration would end the script after `max_seconds`."""

    def __init__(self, max_seconds: float, start: float | None = None) -> None:
        self.max_seconds = max_seconds
        self.start = time.perf_counter() if start is None else start

    def refuse(self, predicted_s: float) -> str | None:
        """None when `predicted_s` more seconds still fit; else the reason, for the report."""
        elapsed = time.perf_counter() - self.start
        if elapsed + predicted_s <= self.max_seconds:
            return None
        return f"time guard: {elapsed:.0f} s elapsed + {predicted_s:.0f} s predicted > --max-seconds {self.max_seconds:.0f}"
