"""Plain counters the scheduler keeps for `/metrics` (read at scrape time, never locked)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class SchedulerCounters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefills: int = 0
    prefill_chunks: int = 0
    decode_steps: int = 0
    running: int = 0
    waiting: int = 0
    batch_size: int = 0  # rows in the latest decode step
    finished: Counter = field(default_factory=Counter)  # by finish reason, "cancelled" and "error" included
    window_s: float = field(default=10.0, repr=False)
    _recent: deque = field(default_factory=deque, repr=False)  # (time, tokens) pairs inside the window
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tokens_generated(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._recent) / self.window_s

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
