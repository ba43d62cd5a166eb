"""`bandwidth.probe_bandwidth`: the link measurement `plan` uses when no bandwidth is given."""

from __future__ import annotations

import time

import torch

from torus_plugins.bandwidth import probe_bandwidth


def test_cpu_probe_measures_a_real_copy_rate() -> None:
    nbytes = 16 * 2**20
    bps = probe_bandwidth("cpu", nbytes=nbytes, repeats=3)
    # Cross-check against one copy timed here: best-of-3 is at least as fast as a single copy,
    # and no memory system copies 16 MiB in under a microsecond.
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    single = nbytes / (time.perf_counter() - t0)
    assert bps >= 0.5 * single
    assert bps < nbytes / 1e-6


def test_probe_accepts_a_device_object() -> None:
    assert probe_bandwidth(torch.device("cpu"), nbytes=2**20, repeats=1) > 0
