"""`StallLedger`: device-side stall timings, folded in later, with a bounded backlog."""

from __future__ import annotations

from torus_plugins.stalls import StallLedger


class Timing:
    """A `PendingStall`: a measured wait whose end event may not have completed yet."""

    def __init__(self, seconds: float, finished: bool) -> None:
        self._seconds, self._finished = seconds, finished
        self.reads = 0

    def finished(self) -> bool:
        return self._finished

    def seconds(self) -> float:
        self.reads += 1
        self._finished = True  # reading synchronises
        return self._seconds


def test_host_seconds_are_counted_at_once_and_device_timings_at_settle() -> None:
    totals = [0.0, 0.0]
    ledger = StallLedger(lambda i, s: totals.__setitem__(i, totals[i] + s))
    ledger.record(0, 0.5)
    assert totals == [0.5, 0.0] and len(ledger) == 0
    t = Timing(0.25, finished=False)
    ledger.record(1, t)
    assert totals == [0.5, 0.0] and len(ledger) == 1
    ledger.settle(only_finished=True)
    assert t.reads == 0 and len(ledger) == 1  # never synchronises for an unfinished timing
    ledger.settle()
    assert totals == [0.5, 0.25] and len(ledger) == 0 and t.reads == 1


def test_backlog_stays_bounded_when_stats_are_never_read() -> None:
    total = [0.0]
    ledger = StallLedger(lambda i, s: total.__setitem__(0, total[0] + s), limit=8)
    for k in range(1000):
        ledger.record(0, Timing(0.001, finished=k % 2 == 0))
        assert len(ledger) <= 16
    ledger.settle()
    assert abs(total[0] - 1.0) < 1e-9  # every timing counted exactly once


def test_the_engines_use_a_bounded_ledger() -> None:
    import torch
    from conftest import build_tiny

    import torus_plugins as tp

    for name, cfg in (("llama", dict(resident_layers=0)), ("mixtral", dict(moe_cache_experts=16))):
        model = build_tiny(name)
        engine = tp.attach(model, tp.TorusConfig(transport="copy", **cfg))
        streamer = engine.experts if engine.experts is not None else engine.streamer
        assert isinstance(streamer._stalls, StallLedger)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        tp.detach(model)
