"""What the host can do, measured: memory read bandwidth and FFN weight bytes computed per second.

The planner and the engine use the same numbers (`torus-sparse plan` prints them): the dense split
gives the host the share its throughput earns beside the link, and the per-pass switch sends passes
with more tokens than the host keeps up with to the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from . import native
from .fused import FUSED_BOUND, GatedFFN
from .kernels import HostWeight, quantized_weight, raw_weight


@dataclass(frozen=True)
class HostProbe:
    """memory_bps: host memory read bandwidth (bytes/s); ffn_bps: host-format FFN weight bytes
    computed per second at one token; ffn_bps_at: the same at `probe_tokens` tokens (how host
    time grows with a pass's tokens); kernel / act_dtype: the fastest host kernel found."""

    memory_bps: float
    ffn_bps: float
    ffn_bps_at: float
    probe_tokens: int
    kernel: str
    act_dtype: torch.dtype | None
    threads: int

    @property
    def efficiency(self) -> float:
        """FFN weight bytes read per second ÷ memory read bandwidth (1.0 = at the memory limit)."""
        return self.ffn_bps / self.memory_bps if self.memory_bps else 0.0


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best-of-`repeats` seconds of `fn()` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes per second of a sum over `nbytes` of fp32 (a pure read)."""
    t = torch.ones(nbytes // 4)
    return nbytes / best_time(t.sum, repeats)


def _ffn_layer(
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    quant: str | None,
    kernel: str,
    act: torch.dtype | None,
    group: int,
) -> list[HostWeight]:
    """One random gated FFN's (gate, up, down) as the host holds them."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    ws = [torch.randn(s, generator=gen).div_(hidden**0.5).to(dtype) for s in shapes]
    return [
        raw_weight(w, kernel) if quant is None else quantized_weight(w, quant, group, kernel, act, refine=False)
        for w in ws
    ]


def _copy(w: HostWeight) -> HostWeight:
    """The same weight in memory of its own (a model's layers do not share their bytes)."""
    return replace(w, tensors=tuple(t.clone() for t in w.tensors))


def _ffn(ws: list[HostWeight], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """One gated FFN as the engine computes it: in one native call where `fused` would fuse it."""
    g, u, d = ws
    if dtype in FUSED_BOUND and all(w.kernel in ("int4native", "int8native", "bf16native") for w in ws):
        return GatedFFN(g, u, d, "silu", dtype)
    return lambda x: d.linear(F.silu(g.linear(x)) * u.linear(x))


def ffn_runner(
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    quant: str | None,
    group: int,
    kernel: str,
    act: torch.dtype | None,
    tokens: int = 1,
    target_bytes: int = 96 * 2**20,
) -> tuple[Callable[[], None], int]:
    """(run, host-format weight bytes it reads): one pass of `tokens` tokens through gated FFNs of
    these shapes, enough layers to exceed the caches (`target_bytes` of weights in the host's
    format, at most 64 layers), as a model does. Counted in the host's format because that is
    what is read: int4 layers of SmolLM2's shapes sized by their fp32 bytes would fit in a
    desktop's L3 and time the cache, not the memory. One layer is built (quantizing is the slow
    part) and copied into the others' own memory."""
    first = _ffn_layer(hidden, inter, dtype, quant, kernel, act, group)
    per_layer = sum(w.nbytes for w in first)
    layers = max(1, min(64, -(-target_bytes // max(1, per_layer))))
    weights = [first] + [[_copy(w) for w in first] for _ in range(layers - 1)]
    nbytes = per_layer * layers
    ffns = [_ffn(ws, dtype) for ws in weights]
    x = torch.randn(tokens, hidden).to(dtype)

    def run() -> None:
        with torch.no_grad():
            for ffn in ffns:
                ffn(x)

    return run, nbytes


def candidates(dtype: torch.dtype, quant: str | None) -> list[tuple[str, torch.dtype | None]]:
    """(kernel, activation dtype) pairs worth timing for weights of `dtype` streamed as `quant`."""
    if quant is None:
        own = [("bf16native", None)] if dtype == torch.bfloat16 and native.unavailable() is None else []
        return own + [("raw", None)]
    packed = "int8pack" if quant == "int8" else "int4pack"
    acts = [dtype] + ([torch.bfloat16] if dtype == torch.float32 else [])
    own = [(f"{quant}native", None)] if native.unavailable() is None else []
    return own + [(packed, a) for a in acts] + [("dequantize", None)]


def probe_host(
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    quant: str | None,
    group: int,
    probe_tokens: int = 16,
    quick: bool = False,
) -> HostProbe:
    """Measure the host for FFNs of these shapes; picks the fastest kernel among `candidates`.
    `quick`: smaller buffers and fewer repeats (tests, tiny models)."""
    target = 8 * 2**20 if quick else 96 * 2**20
    reps = 1 if quick else 3
    mem = memory_bandwidth(32 * 2**20 if quick else 256 * 2**20, 2 if quick else 5)

    def throughput(kernel: str, act: torch.dtype | None, tokens: int) -> float:
        run, nbytes = ffn_runner(hidden, inter, dtype, quant, group, kernel, act, tokens, target)
        return nbytes / best_time(run, reps)

    best: tuple[float, str, torch.dtype | None] | None = None
    for kernel, act in candidates(dtype, quant):
        bps = throughput(kernel, act, 1)
        if best is None or bps > best[0]:
            best = (bps, kernel, act)
    assert best is not None
    bps, kernel, act = best
    at = throughput(kernel, act, probe_tokens)
    return HostProbe(mem, bps, at, probe_tokens, kernel, act, torch.get_num_threads())
