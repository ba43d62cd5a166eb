"""`TorusConfig`: every knob of the engine, validated once when the config is built."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from .errors import ConfigError

#: int4 columns per scale/minimum code: the size that meets the quality target on the embedded
#: SmolLM2 (benchmarks/results/quant_quality.json). One definition for every default that names it.
DEFAULT_QUANT_GROUP_SIZE = 32
#: The enumerations a field accepts, defined once: the config validates against them, the expert
#: cache implements them, the CLI offers them as choices.
WEIGHT_QUANTS = ("int8", "int4")
MOE_CACHE_SCOPES = ("shared", "per-layer")
MOE_EVICTIONS = ("next-use", "lru", "lfu")
HOST_COMPUTE_MODES = ("off", "auto", "all")
HOST_KERNELS = ("auto", "native", "packed", "packed-bf16", "dequantize")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
SIZE_FORMS = "an integer number of bytes, or a string such as '6GB', '6GiB', '512MiB', '1.5 GB', '2000000000'"
#: Larger than any memory or link: a value above it is a typo (or hostile input), not a size.
MAX_BYTES = 2**60


def parse_bytes(value: int | float | str, what: str = "size") -> int:
    """Parse a byte count: 6_000_000_000, "6GB" (10**9), "6GiB" (2**30), "512 MiB", "1.5GB".

    Raises `ConfigError` showing the accepted forms when the value cannot be read.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a size; use {SIZE_FORMS}")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{what}: {value!r} is not a finite size; use {SIZE_FORMS}")
        if value < 0:
            raise ConfigError(f"{what}: {value!r} is negative; use {SIZE_FORMS}")
        return _bounded(int(value), value, what)
    if isinstance(value, str) and len(value) <= 64:
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            # Decimal, not float: exact for long digit strings, and never an OverflowError.
            return _bounded(int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()]), value, what)
    raise ConfigError(f"{what}: cannot read {_shown(value)}; use {SIZE_FORMS}")


def _shown(value: object) -> str:
    """`value` for an error message, cut short: untrusted input may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:40]}... ({len(text)} characters)"


def _bounded(n: int, value: object, what: str) -> int:
    if n > MAX_BYTES:
        shown = repr(value) if len(repr(value)) <= 64 else f"a {len(str(value))}-digit value"
        raise ConfigError(f"{what}: {shown} is larger than any machine (over 1 EiB); use {SIZE_FORMS}")
    return n


def parse_bandwidth(value: int | float | str, what: str = "bandwidth") -> float:
    """Bytes per second: 25e9, "25GB/s", "25 GiB/s", "25GB" (the "/s" is optional). Must be > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}: {value!r} is not a bandwidth; use bytes per second or e.g. '25GB/s', '12 GiB/s'")
    text = value.strip().removesuffix("/s").removesuffix("ps") if isinstance(value, str) else value
    try:
        bps = float(parse_bytes(text, what)) if isinstance(text, str) else float(text)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(
            f"{what}: cannot read {_shown(value)}; use bytes per second or e.g. '25GB/s', '12 GiB/s'"
        ) from exc
    if not bps > 0 or bps > MAX_BYTES:
        raise ConfigError(
            f"{what}: {_shown(value)} must be a positive, finite number of bytes per second, e.g. '25GB/s'"
        )
    return bps


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _choices(values: tuple[str, ...]) -> str:
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TorusConfig:
    """How a model is split between device and host, and how streamed weights move.

    Attributes:
        vram_budget: device memory the model may use ("6GB", "6GiB", or bytes). Non-FFN weights,
            the slot ring and the KV-cache reserve come first; what remains holds FFN layers
            permanently. `None`: on CUDA, 90% of the free device memory; on the CPU, no limit.
            The zero-copy transport places nothing on a separate device and ignores it.
        lookahead: how many FFN layers ahead are copied while the current one computes (>= 1).
            The ring holds `lookahead + 1` slots.
        resident_layers: overrides the budget's choice of how many FFN layers stay on the device.
        device: compute device ("cuda", "cuda:1", "cpu"). `None`: CUDA when available, else CPU.
        transport: how streamed weights move: "auto" (CUDA copy stream on a GPU, zero-copy on the
            CPU), "cuda", "copy" (a background copy worker; the CPU twin of the CUDA path),
            "zero-copy" (CPU only: compute reads the host store directly), or a plugin's name.
        prefetch: prefetch policy name ("sequential" is built in; plugins add others).
        kv_reserve_tokens: tokens of KV cache the budget keeps free for generation.
        pin_memory: pin the host store (page-locked) when the device is CUDA. `None`: automatic.
        transfer_timeout_s: a transfer that does not finish in this time raises `TransferError`
            instead of hanging the caller.
        weight_quant: stream FFN weights quantized: "int8" (per-output-channel symmetric) or
            "int4" (group-wise asymmetric, two values per byte, a 6-bit scale and minimum code
            per group and two fp16 super-scales per row: about 4.4 bits per weight at group 32);
            dequantized on the device into the slot. Resident layers are dequantized once.
            `None` (default): weights as loaded.
        quant_group_size: columns sharing one int4 scale and minimum code (default 32). A size
            that does not divide a row falls back to the largest even divisor below it.
        store_cache: where a quantized host store is kept as a file, so that it is quantized
            once: "auto" (default: `$TORUS_SPARSE_CACHE/stores`, else
            `~/.cache/torus-sparse/stores`), a directory, or `None` (quantize at every attach,
            write nothing). Keyed by the weights' full contents and the settings, so a file
            never stands in for other weights; checked when opened (size and checksums) and
            rebuilt when it does not match. Used only with `weight_quant`.
        moe_cache_experts: MoE models only: routed experts the device cache holds (all layers
            together with the "shared" scope). `None`: as many as the budget leaves room for
            (every expert when there is no budget). Must hold at least one layer's top-k.
        moe_cache_scope: "shared" (one cache for all MoE layers) or "per-layer" (equal shares).
        moe_eviction: which cached expert makes room: "next-use" (default: an expert of the layer
            that runs again last), "lru" or "lfu" (least often routed, ties broken by recency).
            next-use, because layers run in a cycle: once a token's experts outgrow the cache,
            LRU evicts exactly the experts needed soonest (benchmarks/results/moe_cache.json).
        moe_predictor: how the next layers' experts are guessed: "speculative" (the next layer's
            router on the current hidden state), "learned" (a trained predictor file, see
            `moe_predictor_path`), "frequency" (the most often routed experts so far), "none",
            or a plugin's name.
        moe_expert_prefetch_k: experts prefetched per predicted layer (`None`: the model's top-k).
            More raises the hit rate and the wasted bytes.
        moe_predictor_path: the safetensors file of a learned predictor
            (`torus-sparse train-predictor`).
        host_compute: the `host` placement (see `host_compute`): "off" (default: every
            non-resident unit streams), "auto" (each streamed FFN layer's intermediate neurons are
            split between the link and host threads in proportion to the measured link bandwidth
            and host FFN throughput; MoE experts missing from the device cache are computed on the
            host instead of copied), or "all" (every streamed layer and every missing expert is
            computed on the host). Only passes of at most `host_max_tokens` tokens with autograd
            off compute on the host; longer passes (prefill) and grad-enabled ones stream.
        host_share: override the measured split: the fraction (0..1) of each streamed dense
            layer's neurons computed on the host (rounded to blocks of 64 neurons).
        host_max_tokens: override the cost model's per-pass switch: passes with more tokens than
            this stream instead (1 = decode only).
        host_threads: CPU threads for host compute (`torch.set_num_threads` while attached;
            restored at detach). `None`: all cores but one on a CUDA device, so the thread
            feeding the GPU is never starved; unchanged on the CPU.
        host_kernel: how host weights compute: "auto" (the fastest measured on this
            machine), "native" (torus-sparse's own kernels, built with the machine's C compiler
            on first use: int8/int4 as integer dot products on AVX-512 VNNI, activations rounded
            to about fp16's precision; bf16 weights as loaded in fp32 multiply-adds, PyTorch's
            arithmetic up to the order of the sum), "packed" (PyTorch's int8/int4 packed CPU kernels,
            activations in the model's dtype), "packed-bf16" (the same kernels with bf16 activations,
            much faster on CPUs without fp32 paths for them) or "dequantize" (dequantize + matmul).
            fp32 and fp16 weights as loaded always use PyTorch's linear.
        host_budget: host memory the host store may keep resident ("12GiB", or bytes). Below the
            store's size the store lives in its file (`store_cache`), memory-mapped: units are read
            ahead (madvise WILLNEED) as they are about to stream and paged out oldest-first beyond
            the budget, so a model larger than host RAM decodes at disk speed instead of thrashing.
            Needs a copying transport, `store_cache` and `host_compute="off"`; `None`: no limit.
        options: free-form settings for plugins, read by name.
    """

    vram_budget: int | str | None = None
    lookahead: int = 2
    resident_layers: int | None = None
    device: str | None = None
    transport: str = "auto"
    prefetch: str = "sequential"
    kv_reserve_tokens: int = 4096
    pin_memory: bool | None = None
    transfer_timeout_s: float = 30.0
    weight_quant: str | None = None
    quant_group_size: int = DEFAULT_QUANT_GROUP_SIZE
    store_cache: str | None = "auto"
    moe_cache_experts: int | None = None
    moe_cache_scope: str = "shared"
    moe_eviction: str = "next-use"
    moe_predictor: str = "speculative"
    moe_expert_prefetch_k: int | None = None
    moe_predictor_path: str | None = None
    host_compute: str = "off"
    host_share: float | None = None
    host_max_tokens: int | None = None
    host_threads: int | None = None
    host_kernel: str = "auto"
    host_budget: int | str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vram_budget is not None:
            # Normalise once so every reader sees bytes.
            object.__setattr__(self, "vram_budget", parse_bytes(self.vram_budget, "vram_budget"))
        if self.host_budget is not None:
            object.__setattr__(self, "host_budget", parse_bytes(self.host_budget, "host_budget"))
        if not _is_int(self.lookahead) or self.lookahead < 1:
            raise ConfigError(f"lookahead must be an integer >= 1, got {self.lookahead!r}")
        if self.resident_layers is not None and (not _is_int(self.resident_layers) or self.resident_layers < 0):
            raise ConfigError(f"resident_layers must be an integer >= 0 or None, got {self.resident_layers!r}")
        if not _is_int(self.kv_reserve_tokens) or self.kv_reserve_tokens < 0:
            raise ConfigError(f"kv_reserve_tokens must be an integer >= 0, got {self.kv_reserve_tokens!r}")
        if isinstance(self.transfer_timeout_s, bool) or not (
            isinstance(self.transfer_timeout_s, (int, float)) and 0 < self.transfer_timeout_s < float("inf")
        ):
            raise ConfigError(f"transfer_timeout_s must be a positive number, got {self.transfer_timeout_s!r}")
        if self.weight_quant is not None and self.weight_quant not in WEIGHT_QUANTS:
            raise ConfigError(f"weight_quant must be None, {_choices(WEIGHT_QUANTS)}, got {self.weight_quant!r}")
        if not _is_int(self.quant_group_size) or self.quant_group_size < 2 or self.quant_group_size % 2:
            raise ConfigError(f"quant_group_size must be an even integer >= 2, got {self.quant_group_size!r}")
        if self.store_cache is not None and (
            not isinstance(self.store_cache, (str, os.PathLike)) or not str(self.store_cache)
        ):
            raise ConfigError(f"store_cache must be 'auto', a directory or None, got {self.store_cache!r}")
        if self.store_cache is not None:
            object.__setattr__(self, "store_cache", os.fspath(self.store_cache))
        if self.moe_cache_experts is not None and (not _is_int(self.moe_cache_experts) or self.moe_cache_experts < 1):
            raise ConfigError(f"moe_cache_experts must be an integer >= 1 or None, got {self.moe_cache_experts!r}")
        if self.moe_cache_scope not in MOE_CACHE_SCOPES:
            raise ConfigError(f"moe_cache_scope must be {_choices(MOE_CACHE_SCOPES)}, got {self.moe_cache_scope!r}")
        if self.moe_eviction not in MOE_EVICTIONS:
            raise ConfigError(f"moe_eviction must be {_choices(MOE_EVICTIONS)}, got {self.moe_eviction!r}")
        if not isinstance(self.moe_predictor, str) or not self.moe_predictor:
            raise ConfigError(f"moe_predictor must be a name such as 'speculative', got {self.moe_predictor!r}")
        if self.moe_expert_prefetch_k is not None and (
            not _is_int(self.moe_expert_prefetch_k) or self.moe_expert_prefetch_k < 0
        ):
            raise ConfigError(
                f"moe_expert_prefetch_k must be an integer >= 0 or None, got {self.moe_expert_prefetch_k!r}"
            )
        if self.host_compute not in HOST_COMPUTE_MODES:
            raise ConfigError(f"host_compute must be {_choices(HOST_COMPUTE_MODES)}, got {self.host_compute!r}")
        if self.host_share is not None and (
            isinstance(self.host_share, bool)
            or not isinstance(self.host_share, (int, float))
            or not 0.0 <= self.host_share <= 1.0
        ):
            raise ConfigError(f"host_share must be a number from 0 to 1 or None, got {self.host_share!r}")
        if self.host_max_tokens is not None and (not _is_int(self.host_max_tokens) or self.host_max_tokens < 1):
            raise ConfigError(f"host_max_tokens must be an integer >= 1 or None, got {self.host_max_tokens!r}")
        if self.host_threads is not None and (not _is_int(self.host_threads) or self.host_threads < 1):
            raise ConfigError(f"host_threads must be an integer >= 1 or None, got {self.host_threads!r}")
        if self.host_kernel not in HOST_KERNELS:
            raise ConfigError(f"host_kernel must be {_choices(HOST_KERNELS)}, got {self.host_kernel!r}")
        if self.host_compute == "off" and (self.host_share is not None or self.host_max_tokens is not None):
            raise ConfigError("host_share / host_max_tokens tune the host placement: set host_compute='auto' or 'all'")
        if not isinstance(self.transport, str) or not self.transport:
            raise ConfigError(f"transport must be a name such as 'auto', 'copy', 'zero-copy', got {self.transport!r}")
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError(
                f"options must be a dict of plugin settings by name, e.g. {{'link_bandwidth': '12GB/s'}}, "
                f"got {self.options!r}"
            )
        object.__setattr__(self, "options", dict(self.options))

    @property
    def budget_bytes(self) -> int | None:
        """`vram_budget` in bytes (already normalised by `__post_init__`)."""
        return self.vram_budget  # type: ignore[return-value]

    def replace(self, **changes: Any) -> "TorusConfig":
        """A copy with some fields changed (validated like a new config)."""
        values = asdict(self)
        values.update(changes)
        return TorusConfig(**values)
