"""`torus-sparse plan`'s host lines: each millisecond figure prints the rate it is computed from,
and the line between them says why the host's rate beside the link differs from the probe's."""

from __future__ import annotations

import re

import pytest

from torus_plugins.planning.host_split import HOST_FLOOR, HostCosts, forecast

MIB = 2**20
LAYERS = [int(151.9 * MIB / 30)] * 30  # the issue's plan: 151.9 MiB in 30 streamed layers


def _lines(costs: HostCosts) -> dict[str, str]:
    f = forecast(costs, LAYERS, 1536, 16, "int8native", None)
    return {line[:17].strip(): line[17:] for line in f.render()}


def _ms(text: str, label: str) -> float:
    return float(re.search(rf"{label} ([\d.]+) ms", text).group(1))


def _gbs(text: str, label: str) -> float:
    return float(re.search(rf"\({label} ([\d.]+) GB/s\)", text).group(1))


@pytest.mark.parametrize(
    "memory, host, why",
    [
        (100e9, 9.7e9, "the probed rate: the 88.0 GB/s of memory bandwidth left beside the link's 12.0 GB/s"),
        (16e9, 9.7e9, "memory 16.0 GB/s minus the link's 12.0 GB/s of reads from host memory"),
        # The issue's machine: the link's reads (on the CPU, memory itself) leave the host less than the floor.
        (
            12.5e9,
            9.7e9,
            "the link's 12.0 GB/s of reads from host memory leave 0.50 GB/s of its 12.5 GB/s read bandwidth, less than "
            "the floor: counted at 10% of the probed 9.7 GB/s",
        ),
    ],
)
def test_every_millisecond_figure_prints_the_rate_it_is_computed_from(memory, host, why):
    costs = HostCosts(link_bps=12e9, host_bps=host, host_bps_at=host / 2, probe_tokens=16, memory_bps=memory)
    lines = _lines(costs)
    assert lines["host probe"].startswith(f"memory read {memory / 1e9:.1f} GB/s; FFN 9.7 GB/s at 1 token")
    assert why in lines["host FFN rate"]
    beside = costs.effective_host_bps
    assert lines["host FFN rate"].startswith(f"{beside / 1e9:.{2 if beside < 1e9 else 1}f} GB/s beside the link")
    per_token = lines["FFN per token"]
    assert per_token.startswith("151.9 MiB in 30 non-resident layers, batch 1:")
    nbytes = sum(LAYERS)
    # A reader can check each figure: bytes ÷ the printed rate = the printed milliseconds.
    for label, rate in (("streaming-only", "link"), ("host-only", "host")):
        assert nbytes / (_gbs(per_token, rate) * 1e9) * 1e3 == pytest.approx(_ms(per_token, label), rel=0.01)
    assert _ms(per_token, "hybrid") <= min(_ms(per_token, "streaming-only"), _ms(per_token, "host-only"))


def test_the_floor_is_the_issues_tenfold_gap():
    """9.7 GB/s probed, 164 ms for 151.9 MiB: the rate beside the link was the floor, a tenth."""
    costs = HostCosts(link_bps=12e9, host_bps=9.7e9, host_bps_at=5e9, probe_tokens=16, memory_bps=12.5e9)
    assert costs.effective_host_bps == HOST_FLOOR * 9.7e9
    assert _ms(_lines(costs)["FFN per token"], "host-only") == pytest.approx(164.2, abs=0.1)
    assert forecast(costs, LAYERS, 1536, 16, "int8native", None).as_dict()["host_ffn_bps_beside_link"] == 0.97e9
