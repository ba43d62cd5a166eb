"""The `TorusConfig` options every command that loads a model shares (generate, chat, serve,
transformers-serve): one flag per field, defaults and choices read from `TorusConfig` itself."""

from __future__ import annotations

import argparse

from torus_plugins import TorusConfig
from torus_plugins.config import HOST_COMPUTE_MODES, HOST_KERNELS, MOE_CACHE_SCOPES, MOE_EVICTIONS, WEIGHT_QUANTS

DEFAULTS = TorusConfig()


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (TorusConfig)")
    g.add_argument("--vram-budget", help="device memory for the model, e.g. 6GB, 6GiB, 512MiB or bytes")
    g.add_argument(
        "--lookahead",
        type=int,
        default=DEFAULTS.lookahead,
        help="FFN layers copied ahead of compute (default %(default)s)",
    )
    g.add_argument("--resident-layers", type=int, help="FFN layers kept on the device (overrides the budget)")
    g.add_argument("--transport", default=DEFAULTS.transport, help="auto, cuda, copy, zero-copy, or a plugin's name")
    g.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    g.add_argument(
        "--kv-reserve-tokens",
        type=int,
        default=DEFAULTS.kv_reserve_tokens,
        help="KV-cache tokens the budget reserves (default %(default)s)",
    )
    g.add_argument("--weight-quant", choices=WEIGHT_QUANTS, help="stream FFN weights quantized (default: as loaded)")
    g.add_argument(
        "--quant-group-size",
        type=int,
        default=DEFAULTS.quant_group_size,
        help="columns per int4 scale/minimum code (default %(default)s)",
    )
    g.add_argument(
        "--store-cache",
        default=DEFAULTS.store_cache,
        metavar="DIR|auto|off",
        help="where a quantized store is kept so it is quantized once (default %(default)s: "
        "$TORUS_SPARSE_CACHE/stores or ~/.cache/torus-sparse/stores; off: quantize at every load)",
    )
    g.add_argument(
        "--host-budget",
        help="host memory the host store may keep resident, e.g. 12GiB; below the store's size it stays in "
        "its file under --store-cache, memory-mapped and read ahead (a model larger than RAM)",
    )
    h = p.add_argument_group("host placement (FFN layers and missed experts computed on CPU threads)")
    h.add_argument(
        "--host-compute",
        choices=HOST_COMPUTE_MODES,
        default=DEFAULTS.host_compute,
        help="off: stream; auto: split each streamed layer between link and host by measured speed; "
        "all: every streamed layer on the host (default %(default)s)",
    )
    h.add_argument("--host-share", type=float, help="fraction (0..1) of each streamed layer's neurons on the host")
    h.add_argument("--host-max-tokens", type=int, help="longest pass computed on the host (default: cost model)")
    h.add_argument("--host-threads", type=int, help="CPU threads for host compute (default: all but one on CUDA)")
    h.add_argument("--host-kernel", choices=HOST_KERNELS, default=DEFAULTS.host_kernel, help="quantized host kernel")
    m = p.add_argument_group("MoE models (routed experts stream one expert at a time)")
    m.add_argument(
        "--moe-cache-experts", type=int, help="experts the device cache holds (default: what the budget fits)"
    )
    m.add_argument(
        "--moe-cache-scope",
        choices=MOE_CACHE_SCOPES,
        default=DEFAULTS.moe_cache_scope,
        help="one cache or one per layer",
    )
    m.add_argument(
        "--moe-eviction", choices=MOE_EVICTIONS, default=DEFAULTS.moe_eviction, help="which cached expert makes room"
    )
    m.add_argument(
        "--moe-predictor",
        default=DEFAULTS.moe_predictor,
        help="speculative, learned, frequency, none, or a plugin's name",
    )
    m.add_argument("--moe-prefetch-k", type=int, help="experts prefetched per predicted layer (default: top-k)")
    m.add_argument("--moe-predictor-path", help="a learned predictor file (torus-sparse train-predictor)")


def config_from_args(args: argparse.Namespace) -> TorusConfig:
    return TorusConfig(
        vram_budget=args.vram_budget,
        lookahead=args.lookahead,
        resident_layers=args.resident_layers,
        transport=args.transport,
        device=args.device,
        kv_reserve_tokens=args.kv_reserve_tokens,
        store_cache=None if args.store_cache == "off" else args.store_cache,
        host_budget=args.host_budget,
        weight_quant=args.weight_quant,
        quant_group_size=args.quant_group_size,
        moe_cache_experts=args.moe_cache_experts,
        moe_cache_scope=args.moe_cache_scope,
        moe_eviction=args.moe_eviction,
        moe_predictor=args.moe_predictor,
        moe_expert_prefetch_k=args.moe_prefetch_k,
        moe_predictor_path=args.moe_predictor_path,
        host_compute=args.host_compute,
        host_share=args.host_share,
        host_max_tokens=args.host_max_tokens,
        host_threads=args.host_threads,
        host_kernel=args.host_kernel,
    )
