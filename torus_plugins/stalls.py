"""Stall timings measured on the device, folded into counters later so the hot path never waits.

A CUDA wait returns a `PendingStall` (two timing events); reading it synchronises, so the dense
and expert streamers both park them here and settle them when stats are read. The ledger is
bounded: past `limit` pending entries it settles the ones whose events have finished, and past
twice that it settles everything, so a long-running process that never reads stats cannot grow it
without bound.
"""

from __future__ import annotations

import threading
from typing import Callable

from .transfer import PendingStall

#: Pending timings kept before finished ones are folded in.
PENDING_LIMIT = 4096


class StallLedger:
    """Pending device-side stall timings, keyed by a counter index."""

    def __init__(self, add: Callable[[int, float], None], limit: int = PENDING_LIMIT) -> None:
        """add(index, seconds) folds one settled timing into the owner's counters."""
        self._add = add
        self._limit = limit
        self._pending: list[tuple[int, PendingStall]] = []
        self._lock = threading.Lock()  # stats() may be read from another thread

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, index: int, waited: float | PendingStall) -> None:
        """Count a wait: host seconds at once, a device-side timing when it can be read."""
        if type(waited) is float:
            self._add(index, waited)
            return
        with self._lock:
            self._pending.append((index, waited))  # type: ignore[arg-type]
            n = len(self._pending)
        if n > self._limit:
            # Finished timings cost nothing to read; only if the device is far behind (all still
            # pending, twice the limit) does this synchronise, once, to keep memory bounded.
            self.settle(only_finished=n <= 2 * self._limit)

    def settle(self, only_finished: bool = False) -> None:
        """Fold timings into the counters; `only_finished` leaves unfinished ones pending."""
        with self._lock:
            keep = []
            for index, pending in self._pending:
                if only_finished and not pending.finished():
                    keep.append((index, pending))
                else:
                    self._add(index, pending.seconds())
            self._pending = keep

    def clear(self) -> None:
        with self._lock:
            self._pending = []
