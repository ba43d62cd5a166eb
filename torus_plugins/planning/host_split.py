"""The host placement's cost model: how much of each streamed FFN layer the host computes, and up to
how many tokens a pass computes there at all.

At batch 1 a streamed layer of W link bytes costs W / link; computed on the host, its Wh host-format
bytes cost Wh / host (the host's FFN throughput, capped by what memory has left beside the link's own
reads of the host store). Both run at once on their shares, so the host share h that balances them,
h·Wh/host = (1-h)·W/link, makes a token cost about W / (link + host) instead of W / link.
Host time grows with a pass's tokens (the probe measures it at a few), streaming time does not: a
pass computes on the host only while its host share is still faster than streaming the whole layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Longest pass (in tokens) ever computed on the host: beyond it the device wins on any machine
#: (llama.cpp moves weights to the GPU from 32 tokens up).
MAX_HOST_TOKENS = 64


@dataclass(frozen=True)
class HostCosts:
    """Measured rates, bytes per second: link (host→device), host FFN throughput at one token and at
    `probe_tokens`, and host memory read bandwidth."""

    link_bps: float
    host_bps: float
    host_bps_at: float
    probe_tokens: int
    memory_bps: float

    @property
    def effective_host_bps(self) -> float:
        """Host throughput beside the link: streaming reads the host store at link speed too."""
        left = self.memory_bps - self.link_bps
        return max(min(self.host_bps, left), 0.1 * self.host_bps)


def balanced_share(costs: HostCosts, link_bytes: int, host_bytes: int) -> float:
    """The host share that makes both halves of a layer finish together."""
    t_link = link_bytes / costs.link_bps
    t_host = host_bytes / costs.effective_host_bps
    return t_link / (t_link + t_host)


def host_rows(share: float, intermediate: int, align: int) -> int:
    """Neurons computed on the host: `share` of them rounded to `align`; 0 or all when a share
    would be smaller than one aligned block."""
    rows = int(round(share * intermediate / align)) * align
    if rows < align:
        return 0
    if intermediate - rows < align:
        return intermediate
    return rows


def max_host_tokens(costs: HostCosts, share: float, link_bytes: int, host_bytes: int) -> int:
    """Largest pass (tokens) whose host share still beats streaming the whole layer: with host time
    t(T) = t1 + (T - 1)·slope (from the probe's two token counts), share·t(T) <= link_bytes / link."""
    if share <= 0:
        return 0
    scale = costs.effective_host_bps / costs.host_bps  # the same memory cap at every token count
    t1 = host_bytes / costs.effective_host_bps
    tp = host_bytes / (costs.host_bps_at * scale)
    slope = max((tp - t1) / max(costs.probe_tokens - 1, 1), 1e-12)
    full = link_bytes / costs.link_bps
    if share * t1 > full:
        return 0
    return max(1, min(MAX_HOST_TOKENS, 1 + math.floor((full / share - t1) / slope)))


@dataclass(frozen=True)
class TokenCosts:
    """Predicted FFN seconds per decoded token of the non-resident layers, three ways."""

    streaming: float
    host: float
    hybrid: float


def predict(costs: HostCosts, link_bytes: list[int], host_bytes: list[int], shares: list[float]) -> TokenCosts:
    stream = sum(b / costs.link_bps for b in link_bytes)
    host = sum(b / costs.effective_host_bps for b in host_bytes)
    hybrid = sum(
        max((1 - h) * lb / costs.link_bps, h * hb / costs.effective_host_bps)
        for lb, hb, h in zip(link_bytes, host_bytes, shares)
    )
    return TokenCosts(stream, host, hybrid)
