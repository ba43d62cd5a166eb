"""The library's per-model lock (`TorusModel.stream_generate` / `generate`) never deadlocks a thread
against itself: iterators read side by side take turns, an iterator left open unread holds the
model only until its generation ends, one dropped unread is released by the garbage collector
(a tiny model keeps it quick)."""

from __future__ import annotations

import gc
import itertools
import threading

from server_fixtures import tiny_model


def _within(seconds: float, work) -> object:
    """Run `work()` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlocked"
    return out[0]


def test_two_iterators_read_in_one_thread_take_turns():
    tm = tiny_model()
    alone = [tm.generate("Hello", max_new_tokens=6, do_sample=False), tm.generate("Bye", max_new_tokens=6)]

    def zipped() -> list[str]:
        a = tm.stream_generate("Hello", max_new_tokens=6)
        b = tm.stream_generate("Bye", max_new_tokens=6)
        texts = ["", ""]
        for x, y in itertools.zip_longest(a, b, fillvalue=""):
            texts[0] += x
            texts[1] += y
        return texts

    assert _within(120, zipped) == alone


def test_an_iterator_left_open_does_not_block_generate_elsewhere_or_here():
    tm = tiny_model()
    held = tm.stream_generate("Hello", max_new_tokens=8)
    first = next(held)  # open, and never read further in this test until the end
    assert isinstance(first, str)
    assert isinstance(_within(120, lambda: tm.generate("Bye", max_new_tokens=4)), str)  # another thread
    assert isinstance(tm.generate("Bye", max_new_tokens=4), str)  # the iterator's own thread
    held.close()


def test_an_iterator_dropped_unread_is_released():
    tm = tiny_model()
    dropped = tm.stream_generate("Hello", max_new_tokens=200)
    next(dropped)
    del dropped
    gc.collect()
    assert isinstance(_within(120, lambda: tm.generate("Bye", max_new_tokens=4)), str)
