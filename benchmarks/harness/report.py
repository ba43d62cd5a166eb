"""What a run prints: rich tables, verdicts, byte sizes, timestamped progress lines."""

from __future__ import annotations

import time
from typing import Any, Sequence


def table(title: str, columns: Sequence[str], left: int = 1) -> Any:
    """A rich Table with these columns: the first `left` left-aligned (names), the rest right-aligned."""
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left else "right")
    return t


def show(*renderables: Any, width: int | None = 200) -> Any:
    """Print tables or lines (rich markup allowed) on a console `width` wide (None: the terminal's); returns the console."""
    from rich.console import Console

    console = Console(width=width)
    for r in renderables:
        console.print(r)
    return console


def pass_fail(ok: bool | None, none: str = "-") -> str:
    return none if ok is None else ("PASS" if ok else "FAIL")


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
