"""The engine's helper threads run torch ops on themselves alone: an OpenMP pool of their own
would make libgomp stop spinning its idle workers, slowing every parallel op of the compute thread
(`torus_plugins.cpu_threads`)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import wide_llama

import torus_plugins as tp
from torus_plugins.cpu_threads import single_threaded


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with OMP_NUM_THREADS=1, where no pool is ever made
    yield
    torch.set_num_threads(before)


def test_single_threaded_affects_only_the_calling_thread(two_torch_threads) -> None:
    seen: dict[str, int] = {}

    def helper() -> None:
        single_threaded()
        torch.ones(1 << 20).sum()
        seen["helper"] = torch.get_num_threads()

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    later = threading.Thread(target=lambda: seen.__setitem__("later", torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == {"helper": 1, "later": 2}
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
@pytest.mark.parametrize(
    "extra", [{}, {"weight_quant": "int4", "host_compute": "auto", "host_share": 0.5, "host_max_tokens": 1}]
)
def test_streaming_and_host_compute_start_no_openmp_pool(two_torch_threads, extra: dict) -> None:
    model = wide_llama()
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # the main thread's own pool
    py_before, os_before = threading.active_count(), os_threads()
    engine = tp.attach(model, transport="copy", resident_layers=0, **extra)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert engine.stats().bytes_moved > 0
    if extra:
        assert engine.stats().host_calls > 0
    # the helper threads themselves (copy thread, host worker), and no OpenMP worker beside them
    assert os_threads() - os_before == threading.active_count() - py_before > 0
    tp.detach(model)
