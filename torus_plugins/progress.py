"""What a long attach is doing, for people and programs watching it.

Attaching a large model takes minutes in places: packing (and quantizing) every FFN layer or
expert, measuring the host, checking the host kernels against streaming, writing the store file.
Each step is announced on the logger `torus_plugins.progress` at INFO level: one record when a
step starts, then one at most every `INTERVAL` seconds while it counts units, and one when it
ends with its time. Each record carries `phase`, `done`, `total` and `elapsed_s` as attributes,
so a handler can draw its own bar (the console command updates its status line with them); a
library user sees them with `logging.basicConfig(level=logging.INFO)`. The `progress(done, total)`
callback of `attach` keeps getting every unit of the packing steps.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("torus_plugins.progress")

#: Seconds between two records of one step's count.
INTERVAL = 5.0


class Step:
    """One step of attach: `advance(done)` as units finish; records are rate-limited."""

    def __init__(self, phase: str, total: int | None, callback: Callable[[int, int], None] | None) -> None:
        self.phase, self.total, self.callback = phase, total, callback
        self.t0 = self._last = time.monotonic()
        self.done = 0
        self._emit(f"{phase}…")

    def _emit(self, message: str) -> None:
        elapsed = time.monotonic() - self.t0
        extra = {"phase": self.phase, "done": self.done, "total": self.total, "elapsed_s": elapsed}
        log.info("torus-sparse: %s", message, extra=extra)

    def advance(self, done: int) -> None:
        self.done = done
        if self.callback is not None and self.total is not None:
            self.callback(done, self.total)
        now = time.monotonic()
        if now - self._last >= INTERVAL and self.total:
            self._last = now
            self._emit(f"{self.phase}: {done}/{self.total} ({now - self.t0:.0f} s)")

    def end(self) -> None:
        count = f"{self.done}/{self.total} " if self.total else ""
        self._emit(f"{self.phase}: {count}done in {time.monotonic() - self.t0:.1f} s")


@contextmanager
def step(phase: str, total: int | None = None, callback: Callable[[int, int], None] | None = None) -> Iterator[Step]:
    """Announce `phase` (of `total` units, when it counts them) for the length of the block."""
    s = Step(phase, total, callback)
    yield s
    s.end()
