"""Progress lines for long tool runs when stderr is not a terminal (adapters/tools/progress_report.py)."""

from __future__ import annotations

import io

from torus_adapters.tools.progress_report import progress_bar, progress_lines


class Clock:
    """A clock the test moves by hand, so the line schedule is exact and no test waits."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_first_then_every_period_with_an_eta_then_last():
    out, clock = io.StringIO(), Clock()
    update, stop = progress_lines("training", out, every_s=30, clock=clock)
    for step in range(1, 101):
        clock.now += 1.0  # one second a step: 100 s in all
        update(step, 100)
    stop()
    lines = out.getvalue().splitlines()
    # Step 1 at 1 s, then every 30 s (steps 31, 61, 91), and the last step.
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/100", "31/100", "61/100", "91/100", "100/100"]
    assert lines[1] == "training: 31/100 (31%), elapsed 0:00:31, ETA 0:01:09"
    assert lines[-1] == "training: 100/100 (100%), elapsed 0:01:40"


def test_a_run_stopped_early_says_where_it_stopped():
    out, clock = io.StringIO(), Clock()
    update, stop = progress_lines("recording routing", out, every_s=30, clock=clock)
    update(10, 400)
    clock.now += 5
    update(40, 400)
    stop()
    assert out.getvalue().splitlines()[-1] == "recording routing: 40/400 (10%), elapsed 0:00:05, ETA 0:00:45"


def test_a_stream_that_is_not_a_terminal_gets_lines_not_a_bar():
    out = io.StringIO()
    update, stop = progress_bar("training", out)
    update(1, 3)
    update(3, 3)
    stop()
    assert out.getvalue().splitlines()[0].startswith("training: 1/3 (33%)")
