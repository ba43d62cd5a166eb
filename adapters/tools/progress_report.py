"""Progress for long tool runs (routing traces, predictor training): a rich bar with an ETA on a
terminal, else one line every `every_s` seconds, so a run logged to a file still shows it moves."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

#: Seconds between progress lines when stderr is not a terminal.
LINE_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_lines(
    label: str, stream: TextIO, every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """Periodic `label: done/total (pct), elapsed, ETA` lines: the first update, then at most one
    per `every_s` seconds, and the last one. Returns (update, stop)."""
    started = clock()
    state = {"last": None, "done": 0, "total": 0}

    def line(done: int, total: int) -> None:
        elapsed = clock() - started
        eta = f", ETA {_clock(elapsed * (total - done) / done)}" if 0 < done < total else ""
        pct = f" ({done / total:.0%})" if total else ""
        stream.write(f"{label}: {done}/{total}{pct}, elapsed {_clock(elapsed)}{eta}\n")
        stream.flush()

    def update(done: int, total: int) -> None:
        state["done"], state["total"] = done, total
        now = clock()
        if state["last"] is None or now - state["last"] >= every_s or done >= total:
            state["last"] = now
            line(done, total)

    def stop() -> None:
        if state["done"] < state["total"]:  # stopped early (an error, Ctrl+C): say where
            line(state["done"], state["total"])

    return update, stop


def progress_bar(label: str, stream: TextIO | None = None) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(update(done, total), stop): a rich bar with elapsed time and ETA on a terminal, else
    `progress_lines`. Both write to stderr unless `stream` is given."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return progress_lines(label, stream)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
        console=Console(file=stream),
    )
    task = bar.add_task(label, total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop
