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

from ..config import format_bytes

#: Longest pass (in tokens) ever computed on the host: beyond it the device wins on any machine
#: (llama.cpp moves weights to the GPU from 32 tokens up).
MAX_HOST_TOKENS = 64
#: The least share of its probed FFN rate the host is credited with beside the link: the two
#: contend for memory, but the probes cannot say how it divides (a guess, kept pessimistic).
HOST_FLOOR = 0.1


def _gbs(bps: float) -> str:
    return f"{bps / 1e9:.2f} GB/s" if bps < 1e9 else f"{bps / 1e9:.1f} GB/s"


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
        return max(min(self.host_bps, left), HOST_FLOOR * self.host_bps)

    def why_effective(self) -> str:
        """Why `effective_host_bps` is what it is, in words (`torus-sparse plan` prints it: the probe's
        FFN rate alone and the host-only milliseconds otherwise do not reconcile for a reader)."""
        left = self.memory_bps - self.link_bps
        link = f"the link's {_gbs(self.link_bps)} of reads from host memory"
        if self.host_bps <= left:
            return f"the probed rate: the {_gbs(left)} of memory bandwidth left beside {link} does not limit it"
        if left >= HOST_FLOOR * self.host_bps:
            return f"memory {_gbs(self.memory_bps)} minus {link}"
        return (
            f"{link} leave {_gbs(max(left, 0.0))} of its {_gbs(self.memory_bps)} read bandwidth, less than the "
            f"floor: counted at {HOST_FLOOR:.0%} of the probed {_gbs(self.host_bps)}"
        )


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


def balanced_rows(costs: HostCosts, link_bytes: int, host_bytes: int, intermediate: int, align: int) -> int:
    """Host neurons of the aligned split that finishes soonest: the balanced share rounded down or
    up to whole blocks, none, or all. Rounding the share to the nearest block is not enough: where
    the balanced share is under a block or two (a memory-starved host), one block on the host can
    take longer than streaming the whole layer."""
    share = balanced_share(costs, link_bytes, host_bytes)
    low = int(share * intermediate // align) * align

    def seconds(rows: int) -> float:
        h = rows / intermediate
        return max((1 - h) * link_bytes / costs.link_bps, h * host_bytes / costs.effective_host_bps)

    candidates = sorted({0, intermediate, low, min(low + align, intermediate)})
    return min(candidates, key=seconds)  # ties: the fewest host rows


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


@dataclass(frozen=True)
class HostForecast:
    """What host_compute="auto" would do for a model on this machine, and what each placement
    predicts (`torus-sparse plan`; the engine computes the same split with the same functions)."""

    costs: HostCosts
    kernel: str
    act_dtype: str | None
    share: float
    rows: int
    intermediate: int
    max_tokens: int
    seconds: TokenCosts
    layers: int

    def tok_s(self, seconds: float, other_s: float = 0.0) -> float:
        return 1.0 / (seconds + other_s) if seconds + other_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return {
            "link_bps": self.costs.link_bps,
            "host_memory_bps": self.costs.memory_bps,
            "host_ffn_bps": self.costs.host_bps,
            "host_ffn_bps_at_probe_tokens": self.costs.host_bps_at,
            "host_ffn_bps_beside_link": self.costs.effective_host_bps,
            "probe_tokens": self.costs.probe_tokens,
            "kernel": self.kernel,
            "act_dtype": self.act_dtype,
            "host_share": self.share,
            "host_rows": self.rows,
            "intermediate": self.intermediate,
            "max_host_tokens": self.max_tokens,
            "streamed_layers": self.layers,
            "ffn_s_per_token": {
                "streaming": self.seconds.streaming,
                "host": self.seconds.host,
                "hybrid": self.seconds.hybrid,
            },
            "ffn_tok_s_ceiling": {
                "streaming": self.tok_s(self.seconds.streaming),
                "host": self.tok_s(self.seconds.host),
                "hybrid": self.tok_s(self.seconds.hybrid),
            },
        }

    def render(self) -> list[str]:
        """Every rate a millisecond figure is computed from is printed beside it: the probe times
        the host's FFNs alone, but every host figure below runs beside the link's reads of memory."""
        c, s = self.costs, self.seconds
        act = f", {self.act_dtype} activations" if self.act_dtype else ""
        per_token = format_bytes(s.streaming * c.link_bps)  # the streamed layers' bytes, as the link moves them
        host = _gbs(c.effective_host_bps)
        return [
            f"host probe       memory read {_gbs(c.memory_bps)}; FFN {_gbs(c.host_bps)} at 1 token, "
            f"{_gbs(c.host_bps_at)} at {c.probe_tokens} (measured alone; {self.kernel} kernel{act})",
            f"host FFN rate    {host} beside the link ({c.why_effective()})",
            f"FFN per token    {per_token} in {self.layers} non-resident layers, batch 1: "
            f"streaming-only {s.streaming * 1e3:.1f} ms (link {_gbs(c.link_bps)}), "
            f"host-only {s.host * 1e3:.1f} ms (host {host}), hybrid {s.hybrid * 1e3:.1f} ms (both at once)",
            f"hybrid split     {self.share:.0%} of each layer's neurons on the host ({self.rows} of {self.intermediate}), "
            f"passes of <= {self.max_tokens} token{'' if self.max_tokens == 1 else 's'}; longer ones stream",
        ]


def forecast(
    costs: HostCosts,
    link_bytes: list[int],
    intermediate: int,
    align: int,
    kernel: str,
    act_dtype: str | None,
    share: float | None = None,
) -> HostForecast:
    """The split host_compute="auto" picks for layers streaming `link_bytes` each (host-format
    bytes taken equal: the same weights in the same format class), and the three predictions."""
    b = link_bytes[0] if link_bytes else 0
    if share is None and b:
        rows = balanced_rows(costs, b, b, intermediate, align)
    else:
        rows = host_rows(share or 0.0, intermediate, align)
    actual = rows / intermediate if intermediate else 0.0
    tokens = max_host_tokens(costs, actual, b, b) if b else 0
    seconds = predict(costs, link_bytes, link_bytes, [actual] * len(link_bytes))
    return HostForecast(costs, kernel, act_dtype, actual, rows, intermediate, tokens, seconds, len(link_bytes))
