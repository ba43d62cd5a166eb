"""GPU check: a ~7B Llama streamed by torus-sparse (bf16, int8, int4) against the same model fully
resident and against accelerate's CPU offload at the same device budget.

One command, no network, under 8 minutes on one H100/H200 (the script guards itself to
--max-seconds, default 420 s):

    python3 benchmarks/gpu_check.py            # the real check (needs CUDA)
    python3 benchmarks/gpu_check.py --tiny     # same script, tiny model; runs on the CPU too

Phases, all on ONE host model (no deepcopy; host RAM holds one copy plus the engine's store):

 1. Build: a random-init LlamaForCausalLM (hidden 4096, intermediate 11008, 32 layers, 32 heads,
    vocab 32000: 6.74 B parameters, 13.5 GB in bf16). The module tree is built with no storage
    (accelerate's `init_empty_weights`, so only the rotary buffers are real), then every parameter
    is created in bf16: `normal_(0, 0.02)` per matrix in module order, drawn on the GPU from one
    `torch.Generator` seeded with --seed and copied to the host matrix by matrix (seconds, where
    one CPU thread takes 45-60 s), ones for the RMSNorm weights. No float32 copy, no transformers
    default init. (--tiny on the CPU draws on the CPU: other numbers for the same seed.)
 2. Link: pinned host->device bandwidth. A pinned 1 GiB uint8 buffer is copied into a device
    buffer with `non_blocking=True` on a side stream, timed with CUDA events on that stream; one
    warm-up, best of 5. The same is done for one FFN layer's bytes (the engine's transfer unit).
    Without CUDA (`--tiny` on the CPU) a host memcpy of the same sizes is timed instead.
 3. Baseline: `model.to("cuda")` (everything resident), logits of a fixed 32-token prompt, a
    short warm-up generation, then the timed decode; peak memory; `model.to("cpu")`.
 4. Side by side, in this order (so that a time-guard cut drops extra lookaheads before it drops a
    comparison): torus bf16 at lookahead 2, accelerate offload, torus int8 and int4 at lookahead
    2, then the other lookaheads (1, 3) of bf16, int8, int4.
    * torus-sparse: `attach(model, transport="cuda", vram_budget=B, lookahead=L, weight_quant=
      None | "int8" | "int4")` (int4 at the engine's default group size, 32), B computed from the model's own sizes so
      that --resident-ffn (default 4) bf16 FFN layers fit:
          B(L) = non-FFN bytes + KV reserve (kv_reserve_tokens x KV bytes/token)
                 + (L + 1) ring slots x layer bytes + resident_ffn x layer bytes + layer/2 slack
      The same B(L) for every format: a quantized slot holds the landed bytes plus the
      dequantized layer, so the planner may keep fewer layers resident for int8/int4. Before
      attach, the planner (`torus_plugins.planning.deployment.make_plan`, shapes only) predicts the plan and
      the link ceiling (bandwidth / streamed bytes per token); both are recorded next to what the
      engine chose and measured. Logits of the prompt against the baseline (`torch.equal`, max
      |diff|, top-1 agreement), warm-up, `reset_stats()`, timed decode, stats, peak memory, the
      host store's page-locking (exact-size cudaHostRegister bytes, pinned-allocator fallbacks)
      and `torch.cuda.host_memory_stats()`, then `detach(model)`.
    * accelerate offload (same budget as torus at lookahead 2): `infer_auto_device_map(model,
      max_memory={0: B(2), "cpu": ...}, no_split_module_classes=["LlamaDecoderLayer"])`, then
      `dispatch_model(model, device_map, offload_buffers=False)`: the decoder layers that do not
      fit stay on the host and accelerate's hooks copy them to the GPU (pageable, synchronously)
      at every forward pass. `--accelerate-memory weights` gives it B minus the KV reserve instead
      (the device memory torus has for weights). Batch-1 offload is slow, so it decodes only
      --accelerate-steps (4) tokens, once, after a 1-step warm-up. Afterwards
      `remove_hook_from_module(model, recurse=True)` and every original host Parameter object is
      put back, so later phases run on the same weights (the next bf16 run's logits check shows it).
    * Quantized runs: detach() after a quantized attach leaves the *dequantized* weights in the
      model (documented: the engine does not keep the originals), so after every run the original
      host FFN tensors are re-bound; every run therefore quantizes the same original weights.

Timed decode (every phase): greedy, batch 1, KV cache, `generate(max_new_tokens = min_new_tokens
= steps + 1)`. A logits processor, called once per new token right after that token's forward
pass, synchronises the *compute* stream (`torch.cuda.current_stream().synchronize()`, not the
whole device, so the engine's copy stream keeps running) and reads `time.perf_counter()`.
decode tok/s = steps / (t[steps] - t[0]): prefill excluded, every decode step included.
generate() already synchronises the host with the compute stream once per token (its stopping
check reads a device tensor), so this adds no new wait.

Targets (summary in the JSON and under the table): torus bf16 >= 90% of the link ceiling (best
lookahead) and >= 3x accelerate offload's tok/s at the same budget (lookahead 2's budget); torus
int8 >= 1.8x and int4 >= 3x torus bf16 tok/s (best lookahead of each).

Output: a table on stdout, JSON at --out, else benchmarks/results/gpu_check.json with --record,
else $OUT/gpu_check.json when OUT is set, else benchmarks/results/scratch/gpu_check.json
(gpu_check_tiny.json with --tiny). The JSON is rewritten after
every phase, so a run cut off by a time limit still leaves what it measured; SIGTERM (`timeout`,
a lease ending) marks the phase it cut as interrupted, writes the summary and the table, and
exits 143. Before each phase the script predicts its whole duration (the previous run of the same
mode; a host-placement mode's first run: its format's streaming-only run plus allowances for the
host probe, repacking and `verify`; else the link speed plus an allowance for quantizing and
dequantizing) and skips it, saying so, if it would end after --max-seconds. Each torus run also
times one host store buffer to the device (`store_buffer_link`: registered 4 KiB-page memory may
DMA slower than the probe's pinned block). Exit status is 0 whether or not targets are met;
non-zero only if the script itself fails (143 after SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import torch
from harness import fmt_bytes, free_device_memory, log, peak_allocated, peak_reserved, sync
from torch import nn

TARGET_LINK_FRACTION = 0.90
TARGET_VS_ACCELERATE = 3.0  # torus bf16 tok/s over accelerate offload at the same budget
TARGET_INT8 = 1.8  # torus int8 tok/s over torus bf16
TARGET_INT4 = 3.0  # torus int4 tok/s over torus bf16
TARGET_HYBRID = 1.5  # host_compute="auto" tok/s over streaming-only, same format and budget
QUANT_MODES = ("bf16", "int8", "int4")
GiB = 2**30

FULL = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8, vocab_size=1024)
BUDGET_FORMULA = (
    "non_ffn + kv_reserve_tokens*kv_bytes_per_token + (lookahead+1+resident_ffn)*ffn_layer_bytes + ffn_layer_bytes/2"
)
PLANNER_FIELDS = (
    "fits",
    "reason",
    "resident_layers",
    "streamed_layers",
    "n_slots",
    "slot_bytes",
    "streamed_bytes_per_token",
    "device_bytes",
    "host_bytes",
    "predicted_tok_s",
    "config",
)


# --------------------------------------------------------------------------- model
def build_model(dims: dict[str, int], seed: int, device: torch.device | None = None) -> nn.Module:
    """A LlamaForCausalLM with deterministic random bf16 weights on the host, drawn on `device`
    (seeded generator there; `harness.random_bf16`), made without a float32 pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return harness.random_bf16(lambda: LlamaForCausalLM(cfg), seed, device=device)


def ffn_and_non_ffn_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of one FFN layer, bytes of everything that is not FFN), as the engine counts them."""
    layers = model.model.layers
    ffn_ids = {id(p) for layer in layers for p in layer.mlp.parameters()}
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.mlp.parameters()) for layer in layers)
    seen: set[int] = set()
    non_ffn = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in ffn_ids or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        non_ffn += t.numel() * t.element_size()
    return layer_bytes, non_ffn


def kv_bytes_per_token(model: nn.Module) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2  # bf16


def ffn_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.model.layers for p in layer.mlp.parameters()]


# --------------------------------------------------------------------------- decode
def decode(model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    """One timed greedy generate() of steps + 1 new tokens (`harness.timed_generate`): tok/s over the steps."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return harness.timed_generate(model, inputs, steps + 1, pad_token_id=0, device=device).rates()


def timed_decodes(
    model: nn.Module, ids: torch.Tensor, steps: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """`repeats` timed decodes; the median run's numbers, plus every run's tok/s and tokens check."""
    runs = [decode(model, ids, steps, device) for _ in range(repeats)]
    order = sorted(runs, key=lambda r: r["tok_per_s"])
    mid = order[(len(order) - 1) // 2]  # lower median: never flatters
    out = dict(mid)
    out["repeats"] = repeats
    out["tok_per_s_all"] = [r["tok_per_s"] for r in runs]
    out["tokens_consistent"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return out


def prompt_logits(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        sync(device)
    return logits.cpu()


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    return {
        "equal": bool(torch.equal(ref, got)),
        "max_abs_diff": float((ref.float() - got.float()).abs().max()),
    }


def top1_agreement(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.argmax(-1) == got.argmax(-1)).float().mean())


# --------------------------------------------------------------------------- the check's state
@dataclass(kw_only=True)
class Check(harness.DeviceCheck):
    """What every phase reads: the settings, the one host model and its sizes, the baseline."""

    dims: dict[str, int]
    resident_ffn: int
    lookaheads: list[int]
    modes: list[str]
    acc_memory: str
    same_la: int
    model: Any = None
    layer_bytes: int = 0
    non_ffn: int = 0
    kv_tok: int = 0
    model_bytes: int = 0
    ids: Any = None
    link_Bps: float = 0.0
    base: dict[str, Any] = field(default_factory=dict)
    ref_logits: Any = None
    original_ffn: list = field(default_factory=list)
    last_run_s: dict[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.dims["num_hidden_layers"]

    @property
    def kv_reserve(self) -> int:
        return self.kv_tok * self.args.kv_reserve_tokens

    def budget_for(self, la: int) -> int:
        return self.non_ffn + self.kv_reserve + (la + 1 + self.resident_ffn) * self.layer_bytes + self.layer_bytes // 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny Llama (8 layers, hidden 256); CPU + transport 'copy' when no CUDA"
    )
    ap.add_argument(
        "--decode-steps", type=int, default=32, help="decode steps timed (generate makes one more token; default 32)"
    )
    ap.add_argument("--warmup-tokens", type=int, default=4, help="untimed tokens generated before the timed decodes")
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed decodes per run; the (lower) median is reported (default 2)"
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=420.0,
        help="skip a phase whose predicted duration would end the script after this (default 420)",
    )
    ap.add_argument("--lookaheads", default="1,2,3", help="comma-separated lookaheads for the streamed runs")
    ap.add_argument("--quant", default="bf16,int8,int4", help="streamed weight formats: bf16 (none), int8, int4")
    ap.add_argument(
        "--hybrid",
        default="bf16,int8,int4",
        help="formats run again with host_compute='auto' (the host placement) at the same-budget lookahead; '' skips",
    )
    ap.add_argument(
        "--quant-group-size",
        type=int,
        default=None,
        help="TorusConfig.quant_group_size for int4 (default: the engine's, 32: the size that meets the quality target)",
    )
    ap.add_argument(
        "--accelerate-steps", type=int, default=4, help="decode steps timed for accelerate offload (default 4)"
    )
    ap.add_argument("--no-accelerate", action="store_true", help="skip the accelerate offload comparison")
    ap.add_argument(
        "--accelerate-memory",
        choices=("budget", "weights"),
        default=None,
        help="accelerate's max_memory on the device: the whole vram budget (default; accelerate may use the "
        "KV reserve for weights) or 'weights' = budget minus the KV reserve (default with --tiny, where the "
        "KV reserve is most of the budget and nothing would be offloaded otherwise)",
    )
    ap.add_argument(
        "--same-budget-lookahead",
        type=int,
        default=2,
        help="accelerate gets the budget of the streamed runs at this lookahead (default 2)",
    )
    ap.add_argument("--resident-ffn", type=int, default=None, help="FFN layers the budget keeps resident (4; tiny 2)")
    ap.add_argument(
        "--kv-reserve-tokens", type=int, default=4096, help="TorusConfig.kv_reserve_tokens (counted in the budget)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    harness.add_output_args(ap, "gpu_check.json (gpu_check_tiny.json with --tiny)", device_out=True)
    args = ap.parse_args(argv)
    for m in args.quant.split(","):
        if m.strip() and m.strip() not in QUANT_MODES:
            ap.error(f"--quant: unknown format {m.strip()!r}; use {', '.join(QUANT_MODES)}")
    return args


def start(args: argparse.Namespace) -> Check | None:
    """The device, the settings and the report's head; None when a full check finds no CUDA."""
    from torus_plugins import TorusConfig

    picked = harness.pick_device(args.tiny, "gpu_check")
    if picked is None:
        return None
    device, transport = picked
    if args.quant_group_size is None:
        args.quant_group_size = TorusConfig.quant_group_size
    lookaheads = [int(x) for x in args.lookaheads.split(",") if x.strip()]
    name = "gpu_check_tiny.json" if args.tiny else "gpu_check.json"
    c = Check(
        args=args,
        device=device,
        transport=transport,
        dims=TINY if args.tiny else FULL,
        resident_ffn=args.resident_ffn if args.resident_ffn is not None else (2 if args.tiny else 4),
        lookaheads=lookaheads,
        modes=[x.strip() for x in args.quant.split(",") if x.strip()]
        + [f"{x.strip()}+host" for x in args.hybrid.split(",") if x.strip()],
        acc_memory=args.accelerate_memory or ("weights" if args.tiny else "budget"),
        same_la=args.same_budget_lookahead if args.same_budget_lookahead in lookaheads else lookaheads[0],
        run=harness.begin(args, name, device_out=True),
    )
    c.report = {
        "benchmark": "gpu_check" + ("_tiny" if args.tiny else ""),
        **harness.environment(),
        **harness.device_record(device),
        "settings": {
            "tiny": args.tiny,
            "dims": c.dims,
            "dtype": "bfloat16",
            "transport": transport,
            "decode_steps": args.decode_steps,
            "warmup_tokens": args.warmup_tokens,
            "repeats": args.repeats,
            "max_seconds": args.max_seconds,
            "lookaheads": lookaheads,
            "formats": c.modes,
            "quant_group_size": args.quant_group_size,
            "accelerate_steps": None if args.no_accelerate else args.accelerate_steps,
            "accelerate_memory": None if args.no_accelerate else c.acc_memory,
            "same_budget_lookahead": c.same_la,
            "resident_ffn_in_budget": c.resident_ffn,
            "kv_reserve_tokens": args.kv_reserve_tokens,
            "prompt_tokens": args.prompt_tokens,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "targets": {
            "bf16_link": f"torus bf16 decode tok/s >= {TARGET_LINK_FRACTION:.0%} of the link ceiling "
            "(pinned bandwidth / bytes per token)",
            "bf16_vs_accelerate": f"torus bf16 tok/s >= {TARGET_VS_ACCELERATE:g} x accelerate offload at the same budget",
            "int8_vs_bf16": f"torus int8 tok/s >= {TARGET_INT8:g} x torus bf16",
            "int4_vs_bf16": f"torus int4 tok/s >= {TARGET_INT4:g} x torus bf16",
            "hybrid": f"host_compute='auto' tok/s >= {TARGET_HYBRID:g} x streaming-only, same format and budget; "
            "its prompt pass no slower",
        },
        "phases": {},
        "errors": [],
    }
    v = c.report["versions"]
    log(f"device {c.report['device']}; torch {v['torch']}, transformers {v['transformers']}")
    return c


# --------------------------------------------------------------------------- phases 1-3
def build(c: Check) -> None:
    """1. The host model, its sizes, the prompt."""
    t0 = time.perf_counter()
    c.model = model = build_model(c.dims, c.args.seed, c.device)
    n_params = sum(p.numel() for p in model.parameters())
    c.layer_bytes, c.non_ffn = ffn_and_non_ffn_bytes(model)
    c.kv_tok = kv_bytes_per_token(model)
    c.model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c.report["model"] = {
        "parameters": n_params,
        "bytes": c.model_bytes,
        "ffn_layer_bytes": c.layer_bytes,
        "ffn_total_bytes": c.layer_bytes * c.n_layers,
        "non_ffn_bytes": c.non_ffn,
        "kv_bytes_per_token": c.kv_tok,
        "build_s": time.perf_counter() - t0,
    }
    log(
        f"built {n_params / 1e9:.2f} B params ({fmt_bytes(c.model_bytes)}) in {c.report['model']['build_s']:.1f} s; "
        f"FFN layer {fmt_bytes(c.layer_bytes)}, non-FFN {fmt_bytes(c.non_ffn)}"
    )
    g = torch.Generator().manual_seed(c.args.seed + 1)
    c.ids = torch.randint(3, c.dims["vocab_size"], (1, c.args.prompt_tokens), generator=g)
    c.save()


def measure_link(c: Check) -> None:
    """2. Pinned host->device bandwidth: a big buffer (the ceiling's) and one FFN layer."""
    big_name = "1GiB" if c.device.type == "cuda" else "256MiB"
    big = GiB if c.device.type == "cuda" else 256 * 2**20
    bw = harness.link_bandwidth(c.device, {big_name: big, "ffn_layer": c.layer_bytes})
    c.report["bandwidth"] = bw
    c.link_Bps = bw[big_name]["GBps"] * 1e9
    log(f"link: {bw['method']}: big {c.link_Bps / 1e9:.2f} GB/s, one FFN layer {bw['ffn_layer']['GBps']:.2f} GB/s")
    free_device_memory(c.device)
    c.ids = c.ids.to(c.device)
    c.save()


def baseline(c: Check) -> None:
    """3. Everything resident: the reference logits and tokens, the resident tok/s."""
    model, device, args = c.model, c.device, c.args
    t0 = time.perf_counter()
    model.to(device)
    sync(device)
    to_dev_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    c.ref_logits = prompt_logits(model, c.ids, device)
    c.report["model"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    c.report["model"]["baseline_logits_finite"] = bool(torch.isfinite(c.ref_logits.float()).all())
    decode(model, c.ids, args.warmup_tokens, device)
    c.base = base = timed_decodes(model, c.ids, args.decode_steps, args.repeats, device)
    base.update(peak_allocated=peak_allocated(device), peak_reserved=peak_reserved(device), to_device_s=to_dev_s)
    c.report["phases"]["baseline"] = base
    log(
        f"baseline: {base['tok_per_s']:.2f} tok/s ({base['ms_per_token']:.2f} ms/token), "
        f"peak {fmt_bytes(base['peak_allocated'])}"
    )
    t0 = time.perf_counter()
    model.to("cpu")
    base["to_host_s"] = time.perf_counter() - t0
    free_device_memory(device)
    # The host FFN weights as built. detach() after a quantized attach binds the *dequantized*
    # weights (documented: the engine keeps no originals), so these are re-bound after every run.
    c.original_ffn = [(p, p.data) for p in ffn_params(model)]
    c.save()


# --------------------------------------------------------------------------- phase 4
def schedule(c: Check) -> list[tuple[str, str, int]]:
    """One run of each kind first (same-budget lookahead), then the other lookaheads, so a
    time-guard cut loses lookahead variants before it loses a comparison."""
    out: list[tuple[str, str, int]] = [("torus", c.modes[0], c.same_la)] if c.modes else []
    if not c.args.no_accelerate:
        out.append(("accelerate", "bf16", c.same_la))
    out += [("torus", m, c.same_la) for m in c.modes[1:]]
    # the host placement runs at the same-budget lookahead only: its comparison is streaming-only there
    out += [("torus", m, la) for m in c.modes if not m.endswith("+host") for la in c.lookaheads if la != c.same_la]
    return out


#: host placement set-up per GB of FFN weights in the run's format (repacking for the host kernels,
#: `verify`'s token through every host layer both ways) and the host probe, in seconds: allowances
#: until a run of the same format has been timed
HOST_SETUP_S_PER_GB = 3.0
HOST_PROBE_S = 15.0


def predict_s(c: Check, kind: str, mode: str) -> float:
    """A phase's expected seconds, all of it: planner, attach (quantizing; under the host
    placement also the probe, the repacking and `verify`), prompt pass, warm-up, timed decodes,
    detach (dequantizing) and re-binding. The previous run of its mode when there is one; for a
    "+host" mode first run, its format's streaming-only run plus the host allowances; else the
    link speed plus allowances."""
    args = c.args
    if kind == "accelerate":
        # pageable copies of the offloaded layers at every forward pass (~10 GB/s guessed)
        offloaded = max(c.model_bytes - c.budget_for(c.same_la), 0)
        return (args.accelerate_steps + 4) * offloaded / 10e9 + 20.0
    if mode in c.last_run_s:
        return c.last_run_s[mode]
    fmt = mode.removesuffix("+host")
    scale = {"bf16": 1.0, "int8": 0.5, "int4": 0.27}[fmt]
    host_s = 0.0
    if mode.endswith("+host"):
        host_s = HOST_PROBE_S + HOST_SETUP_S_PER_GB * c.n_layers * c.layer_bytes * scale / 1e9
        if fmt in c.last_run_s:
            return c.last_run_s[fmt] + host_s
    tokens_streamed = args.warmup_tokens + args.repeats * (args.decode_steps + 1) + 1
    stream_s = tokens_streamed * c.n_layers * c.layer_bytes * scale / c.link_Bps * 1.3
    # quantizing on the host at attach, dequantizing at detach: ~1 s per GB of FFN weights
    quant_s = 0.0 if fmt == "bf16" else 1.0 * c.n_layers * c.layer_bytes / 1e9
    return stream_s + quant_s + host_s + 20.0


def accelerate_phase(c: Check, name: str, la: int) -> dict[str, Any]:
    budget = c.budget_for(la)
    entry: dict[str, Any] = {"kind": "accelerate", "format": "bf16", "same_budget_as_lookahead": la}
    c.report["phases"][name] = entry
    try:
        weight_memory = budget - c.kv_reserve if c.acc_memory == "weights" else budget
        entry["accelerate_memory"] = c.acc_memory
        entry.update(
            run_accelerate(c.model, budget, weight_memory, c.device, c.ids, c.args.accelerate_steps, c.ref_logits)
        )
        log(
            f"{name}: {entry['tok_per_s']:.3f} tok/s ({entry['ms_per_token']:.0f} ms/token), "
            f"offloaded {len(entry['offloaded_modules'])} modules ({fmt_bytes(entry['offloaded_bytes'])}), "
            f"peak {fmt_bytes(entry['peak_allocated'])} / budget {fmt_bytes(budget)}"
        )
    except Exception as exc:  # noqa: BLE001 - record and go on
        record_error(c, name, entry, exc)
    return entry


def torus_phase(c: Check, name: str, mode: str, la: int) -> dict[str, Any]:
    """Planner prediction, attach, logits against the baseline, timed decodes, stats, detach."""
    import torus_plugins as tp
    from torus_plugins import TorusConfig

    budget = c.budget_for(la)
    fmt = mode.removesuffix("+host")
    cfg = TorusConfig(
        transport=c.transport,
        device=str(c.device),
        vram_budget=budget,
        lookahead=la,
        kv_reserve_tokens=c.args.kv_reserve_tokens,
        weight_quant=None if fmt == "bf16" else fmt,
        quant_group_size=c.args.quant_group_size,
        host_compute="auto" if mode.endswith("+host") else "off",
    )
    entry: dict[str, Any] = {
        "kind": "torus",
        "format": mode,
        "lookahead": la,
        "vram_budget": budget,
        "budget_formula": BUDGET_FORMULA,
    }
    c.report["phases"][name] = entry
    try:
        entry["planner"] = planner_prediction(c.model, cfg, c.link_Bps, c.device)
        free_device_memory(c.device)
        t0 = time.perf_counter()
        eng = tp.attach(c.model, cfg)
        sync(c.device)
        entry["attach_s"] = time.perf_counter() - t0
        record_plan(entry, eng)
        if eng.host_plan is not None:
            entry["host_plan"] = eng.host_plan.as_dict()
        measure_streamed(c, name, entry, eng, mode)
        t0 = time.perf_counter()
        tp.detach(c.model)
        entry["detach_s"] = time.perf_counter() - t0
        del eng
    except Exception as exc:  # noqa: BLE001 - record, keep the model usable, go on
        record_error(c, name, entry, exc)
        if tp.is_attached(c.model):
            tp.detach(c.model)
    restore_ffn(c, entry)
    return entry


def record_plan(entry: dict[str, Any], eng: Any) -> None:
    entry["plan"] = {
        "resident": list(eng.plan.resident),
        "streamed": list(eng.plan.streamed),
        "n_slots": eng.plan.n_slots,
        "slot_bytes": eng.plan.slot_bytes,
        "planned_device_bytes": eng.plan.device_bytes(eng.layer_bytes),
    }
    entry["planner_matches_engine"] = (
        entry["planner"]["resident_layers"] == entry["plan"]["resident"]
        and entry["planner"]["streamed_layers"] == entry["plan"]["streamed"]
    )
    entry["host_pinned_after_attach"] = harness.host_pinned_stats()
    entry["store_pinning"] = store_pinning(eng)
    bufs = [b for b in eng.store.buffers if b is not None]
    if bufs:  # the engine's own transfer unit, as page-locked by the store
        try:
            entry["store_buffer_link"] = harness.buffer_link(eng.device, bufs[-1])
        except Exception as exc:  # noqa: BLE001 - informational only
            entry["store_buffer_link"] = {"error": f"{type(exc).__name__}: {exc}"}


def measure_streamed(c: Check, name: str, entry: dict[str, Any], eng: Any, mode: str) -> None:
    """The attached run: logits, warm-up, reset_stats(), timed decodes, the engine's counters."""
    device, base, budget = c.device, c.base, entry["vram_budget"]
    sync(device)
    t0 = time.perf_counter()
    got = prompt_logits(c.model, c.ids, device)
    sync(device)
    entry["prompt_pass_s"] = time.perf_counter() - t0  # the prefill-sized pass (streams under the host placement)
    entry["logits"] = compare(c.ref_logits, got)
    entry["logits"]["top1_agreement"] = top1_agreement(c.ref_logits, got)
    decode(c.model, c.ids, c.args.warmup_tokens, device)
    eng.reset_stats()
    res = timed_decodes(c.model, c.ids, c.args.decode_steps, c.args.repeats, device)
    st = eng.stats()
    entry.update(res)
    entry["tokens_equal_baseline"] = res["tokens"] == base["tokens"]
    entry["tokens_agreement_baseline"] = sum(a == b for a, b in zip(res["tokens"], base["tokens"])) / len(
        base["tokens"]
    )
    entry["peak_allocated"] = peak_allocated(device)
    entry["planned_device_bytes"] = entry["plan"]["planned_device_bytes"]
    entry["peak_reserved"] = peak_reserved(device)
    entry["within_budget"] = None if entry["peak_allocated"] is None else entry["peak_allocated"] <= budget
    bpt = st.bytes_moved / st.forward_passes if st.forward_passes else 0.0
    ceiling = c.link_Bps / bpt if bpt else float("inf")
    bound = min(ceiling, base["tok_per_s"])
    predicted = entry["planner"]["predicted_tok_s"]
    entry.update(
        bytes_per_token=bpt,
        link_ceiling_tok_per_s=ceiling,
        fraction_of_link_ceiling=res["tok_per_s"] / ceiling,
        fraction_of_planner_prediction=res["tok_per_s"] / predicted if predicted else None,
        bound_tok_per_s=bound,
        fraction_of_bound=res["tok_per_s"] / bound,
        target_pass=(res["tok_per_s"] / ceiling >= TARGET_LINK_FRACTION) if mode == "bf16" else None,
        effective_link_GBps=bpt * res["tok_per_s"] / 1e9,
        hit_rate=st.hit_rate,
        hits=st.hits,
        misses=st.misses,
        stall_ms_per_token=st.stall_s * 1e3 / max(st.forward_passes, 1),
        forward_passes=st.forward_passes,
        engine={k: v for k, v in st.as_dict().items() if k != "layers"},
        layer_stall_ms=[round(lay.stall_s * 1e3, 3) for lay in st.layers],
    )
    log(
        f"{name}: {res['tok_per_s']:.2f} tok/s, {fmt_bytes(bpt)}/token, ceiling {ceiling:.2f} tok/s "
        f"({entry['fraction_of_link_ceiling']:.1%}), hit {st.hit_rate:.1%}, logits equal {entry['logits']['equal']}, "
        f"peak {fmt_bytes(entry['peak_allocated'])} / budget {fmt_bytes(budget)}"
    )


def record_error(c: Check, name: str, entry: dict[str, Any], exc: Exception) -> None:
    entry["error"] = f"{type(exc).__name__}: {exc}"
    c.report["errors"].append({name: traceback.format_exc()})
    log(f"{name} FAILED: {entry['error']}")


def restore_ffn(c: Check, entry: dict[str, Any]) -> None:
    """Re-bind the host FFN tensors as built (detach after a quantized attach leaves dequantized ones)."""
    p0, d0 = c.original_ffn[0]
    entry["detach_restored_original_weights"] = bool(p0.device == d0.device and torch.equal(p0.data, d0))
    for p, d in c.original_ffn:  # also frees the restored copies: host RAM holds one FFN copy
        p.data = d
    free_device_memory(c.device)


def side_by_side(c: Check) -> None:
    """4. Every scheduled run, each skipped if the time guard predicts it would end too late."""
    guard = harness.TimeGuard(c.args.max_seconds, start=c.run.t0)
    for kind, mode, la in schedule(c):
        name = "accelerate_offload" if kind == "accelerate" else f"torus_{mode}_la{la}"
        skipped = guard.refuse(predict_s(c, kind, mode))
        if skipped:
            c.report["phases"][name] = {
                "kind": kind,
                "format": mode,
                "lookahead": la if kind == "torus" else None,
                "skipped": skipped,
            }
            log(f"{name} skipped: {skipped}")
            c.save()
            continue
        t_run = time.perf_counter()
        if kind == "accelerate":
            entry = accelerate_phase(c, name, la)
            entry["run_s"] = time.perf_counter() - t_run
        else:
            entry = torus_phase(c, name, mode, la)
            c.last_run_s[mode] = entry["run_s"] = time.perf_counter() - t_run
        c.save()


def finish(c: Check) -> None:
    c.report["host_pinned_end"] = harness.host_pinned_stats()
    c.report["summary"] = summarize(c.report, c.same_la)
    if any(e.get("detach_restored_original_weights") is False for e in c.report["phases"].values()):
        c.report["engine_notes"] = [
            "detach() after attach(weight_quant=...) leaves the dequantized weights in the model, as documented "
            "(phase field detach_restored_original_weights=false); this script re-binds the original host FFN "
            "tensors after every run."
        ]
    c.save()
    print_table(c.report, c.link_Bps)
    log(f"wrote {c.run.out} ({c.report['wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    c = start(parse_args(argv))
    if c is None:
        return 2
    with harness.terminable(c, lambda: finish(c)):  # SIGTERM still writes the summary
        build(c)
        measure_link(c)
        baseline(c)
        side_by_side(c)
    finish(c)
    return 0


# --------------------------------------------------------------------------- engine and accelerate details
def store_pinning(eng: Any) -> dict[str, Any]:
    """How the engine's host store is page-locked (exact-size cudaHostRegister, or the fallback)."""
    store = eng.store
    registered = getattr(store, "_registered", set())
    bufs = [b for b in store.buffers if b is not None]
    reg_bytes = sum(b.numel() for b in bufs if b.data_ptr() in registered)
    return {
        "store_bytes": store.nbytes,
        "store_buffers": len(bufs),
        "page_locked_by_cudaHostRegister_bytes": reg_bytes,
        "pinned_allocator_fallback_buffers": sum(1 for b in bufs if b.data_ptr() not in registered and b.is_pinned())
        if torch.cuda.is_available()
        else 0,
    }


def planner_prediction(model: nn.Module, cfg: Any, link_Bps: float, device: torch.device) -> dict[str, Any]:
    """The planner's plan and link-ceiling prediction for `cfg`, from shapes alone (before attach)."""
    from torus_plugins.planning.deployment import make_plan
    from torus_plugins.planning.sizes import measure
    from torus_plugins.plugins import resolve

    arch = next(a for a in resolve().architectures if a.matches(model))
    sizes = measure(model, arch, cfg.weight_quant, cfg.quant_group_size)
    plan = make_plan(sizes, cfg, link_Bps, model="llama-random", device=str(device))
    d = plan.as_dict()
    return {k: d[k] for k in PLANNER_FIELDS}


def run_accelerate(
    model: nn.Module,
    budget: int,
    weight_memory: int,
    device: torch.device,
    ids: torch.Tensor,
    steps: int,
    ref_logits: torch.Tensor,
) -> dict[str, Any]:
    """accelerate's big-model inference at the same device budget, from the same host weights.

    `infer_auto_device_map(max_memory={gpu: weight_memory, "cpu": ...})` + `dispatch_model(
    offload_buffers=False)`: decoder layers that do not fit are offloaded to the CPU and moved to
    the GPU (pageable, synchronous) by accelerate's hooks at every forward pass. Afterwards the hooks are removed and
    every original host Parameter/buffer object is put back, so later phases see the same model.
    Without CUDA (--tiny on the CPU) the same code offloads to "disk" (a temp dir) instead.
    """
    import shutil
    import tempfile

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    saved_p = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
    saved_b = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    no_split = list(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    if device.type == "cuda":
        max_memory: dict[Any, Any] = {device.index: weight_memory, "cpu": 2**40}
        offload_kinds = ("cpu", "disk")
    else:
        max_memory = {"cpu": weight_memory}  # the rest goes to "disk"
        offload_kinds = ("disk",)
    entry: dict[str, Any] = {
        "vram_budget": budget,
        "max_memory_for_weights": weight_memory,
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "no_split_module_classes": no_split,
        "decode_steps": steps,
        "note": f"accelerate is slow at batch 1 (every offloaded layer crosses the link synchronously, pageable): "
        f"only {steps} decode steps, 1 repeat",
    }
    offload_dir = None
    t0 = time.perf_counter()
    dm = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch.bfloat16)
    entry["device_map_s"] = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for v in dm.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    entry["device_map_counts"] = counts
    entry["offloaded_modules"] = [k for k, v in dm.items() if str(v) in offload_kinds]
    entry["offloaded_bytes"] = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if any(name == m or name.startswith(m + ".") for m in entry["offloaded_modules"])
    )
    try:
        if any(str(v) == "disk" for v in dm.values()):
            offload_dir = tempfile.mkdtemp(prefix="gpu_check_offload_")
        free_device_memory(device)
        t0 = time.perf_counter()
        dispatch_model(
            model,
            device_map=dm,
            main_device=device.index if device.type == "cuda" else "cpu",
            offload_dir=offload_dir,
            offload_buffers=False,
        )
        sync(device)
        entry["dispatch_s"] = time.perf_counter() - t0
        got = prompt_logits(model, ids, device)
        entry["logits"] = compare(ref_logits, got)
        decode(model, ids, 1, device)  # warm-up
        res = timed_decodes(model, ids, steps, 1, device)
        entry.update(res)
        entry["peak_allocated"] = peak_allocated(device)
        entry["peak_reserved"] = peak_reserved(device)
    finally:
        t0 = time.perf_counter()
        remove_hook_from_module(model, recurse=True)
        for m, n, p in saved_p:
            m._parameters[n] = p
        for m, n, b in saved_b:
            m._buffers[n] = b
        model.__dict__.pop("hf_device_map", None)
        if offload_dir:
            shutil.rmtree(offload_dir, ignore_errors=True)
        free_device_memory(device)
        entry["undispatch_s"] = time.perf_counter() - t0
    entry["host_params_restored"] = all(p.device.type == "cpu" for p in model.parameters())
    return entry


def summarize(report: dict[str, Any], same_la: int) -> dict[str, Any]:
    """The four targets, from the best lookahead of each format and at the same budget."""
    ph = report["phases"]

    def ok(e: dict[str, Any]) -> bool:
        return "tok_per_s" in e and "error" not in e and "skipped" not in e

    def best(fmt: str) -> dict[str, Any] | None:
        runs = [(n, e) for n, e in ph.items() if e.get("kind") == "torus" and e.get("format") == fmt and ok(e)]
        if not runs:
            return None
        n, e = max(runs, key=lambda x: x[1]["tok_per_s"])
        return {"run": n, "tok_per_s": e["tok_per_s"], "fraction_of_link_ceiling": e.get("fraction_of_link_ceiling")}

    def at(fmt: str, la: int) -> float | None:
        e = ph.get(f"torus_{fmt}_la{la}")
        return e["tok_per_s"] if e and ok(e) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    acc = ph.get("accelerate_offload")
    acc_tps = acc["tok_per_s"] if acc and ok(acc) else None
    b16, i8, i4 = best("bf16"), best("int8"), best("int4")
    out: dict[str, Any] = {
        "best": {"bf16": b16, "int8": i8, "int4": i4},
        "accelerate_tok_per_s": acc_tps,
        "bf16_fraction_of_link_ceiling": {
            n: e["fraction_of_link_ceiling"]
            for n, e in ph.items()
            if e.get("kind") == "torus" and e.get("format") == "bf16" and ok(e)
        },
        "bf16_vs_accelerate_same_budget": ratio(at("bf16", same_la), acc_tps),
        "bf16_best_vs_accelerate": ratio(b16 and b16["tok_per_s"], acc_tps),
        "int8_vs_bf16_best": ratio(i8 and i8["tok_per_s"], b16 and b16["tok_per_s"]),
        "int4_vs_bf16_best": ratio(i4 and i4["tok_per_s"], b16 and b16["tok_per_s"]),
        "int8_vs_bf16_same_lookahead": ratio(at("int8", same_la), at("bf16", same_la)),
        "int4_vs_bf16_same_lookahead": ratio(at("int4", same_la), at("bf16", same_la)),
        "hybrid_vs_streaming_same_budget": {
            f: ratio(at(f"{f}+host", same_la), at(f, same_la)) for f in ("bf16", "int8", "int4")
        },
        "hybrid_prompt_pass_vs_streaming": {
            f: ratio(
                (ph.get(f"torus_{f}+host_la{same_la}") or {}).get("prompt_pass_s"),
                (ph.get(f"torus_{f}_la{same_la}") or {}).get("prompt_pass_s"),
            )
            for f in ("bf16", "int8", "int4")
        },
    }

    def verdict(x: float | None, target: float) -> bool | None:
        return None if x is None else x >= target

    out["pass"] = {
        "bf16_link": verdict(b16 and b16["fraction_of_link_ceiling"], TARGET_LINK_FRACTION),
        "bf16_vs_accelerate": verdict(out["bf16_vs_accelerate_same_budget"], TARGET_VS_ACCELERATE),
        "int8_vs_bf16": verdict(out["int8_vs_bf16_best"], TARGET_INT8),
        "int4_vs_bf16": verdict(out["int4_vs_bf16_best"], TARGET_INT4),
        **{f"hybrid_{f}": verdict(r, TARGET_HYBRID) for f, r in out["hybrid_vs_streaming_same_budget"].items()},
    }
    return out


def print_table(report: dict[str, Any], link_Bps: float) -> None:
    s = report["settings"]
    bw = report["bandwidth"]
    title = (
        f"{report['device']}: Llama {report['model']['parameters'] / 1e9:.2f} B bf16, batch 1, "
        f"{s['decode_steps']} decode steps, median of {s['repeats']}; link {link_Bps / 1e9:.1f} GB/s "
        f"(one FFN layer {bw['ffn_layer']['GBps']:.1f} GB/s)"
    )
    cols = (
        "run",
        "tok/s",
        "ms/tok",
        "resident/streamed",
        "bytes/tok",
        "ceiling tok/s",
        "planner tok/s",
        "% ceiling",
        "% min(ceil,base)",
        "hit",
        "stall ms/tok",
        "peak / budget",
        "logits (max|Δ|, top-1)",
        "tokens = base",
    )
    t = harness.table(title, cols)
    n = report["settings"]["dims"]["num_hidden_layers"]
    for name, e in report["phases"].items():
        if "skipped" in e:
            t.add_row(name, "skipped", e["skipped"][:60], *[""] * (len(cols) - 3))
            continue
        if "error" in e:
            t.add_row(name, "ERROR", e["error"][:60], *[""] * (len(cols) - 3))
            continue
        peak_s = f"{fmt_bytes(e.get('peak_allocated'))} / {fmt_bytes(e.get('vram_budget'))}"
        if name == "baseline":
            t.add_row(
                name,
                f"{e['tok_per_s']:.2f}",
                f"{e['ms_per_token']:.1f}",
                f"{n}/0",
                "0",
                *["-"] * 6,
                f"{fmt_bytes(e['peak_allocated'])} / -",
                "reference",
                "reference",
            )
            continue
        if e.get("kind") == "accelerate":
            t.add_row(
                name,
                f"{e['tok_per_s']:.3f}",
                f"{e['ms_per_token']:.0f}",
                f"{len(e['offloaded_modules'])} modules offloaded",
                fmt_bytes(e["offloaded_bytes"]),
                *["-"] * 6,
                peak_s,
                f"{'equal' if e['logits']['equal'] else 'differ'} ({e['logits']['max_abs_diff']:.3g})",
                f"{e['decode_steps']} steps",
            )
            continue
        if e["peak_allocated"] is None:  # CPU: no allocator peak; show the engine's planned bytes
            peak_s = f"plan {fmt_bytes(e['planned_device_bytes'])} / {fmt_bytes(e['vram_budget'])}"
        lg = e["logits"]
        t.add_row(
            f"{name}",
            f"{e['tok_per_s']:.2f}",
            f"{e['ms_per_token']:.1f}",
            f"{len(e['plan']['resident'])}/{len(e['plan']['streamed'])}",
            fmt_bytes(e["bytes_per_token"]),
            f"{e['link_ceiling_tok_per_s']:.2f}",
            f"{e['planner']['predicted_tok_s']:.2f}",
            f"{e['fraction_of_link_ceiling']:.1%}"
            + (" ✓" if e["target_pass"] else (" ✗" if e["target_pass"] is False else "")),
            f"{e['fraction_of_bound']:.1%}",
            f"{e['hit_rate']:.1%}",
            f"{e['stall_ms_per_token']:.1f}",
            peak_s,
            f"{'equal' if lg['equal'] else 'differ'} ({lg['max_abs_diff']:.3g}, {lg['top1_agreement']:.0%})",
            "yes" if e["tokens_equal_baseline"] and e["tokens_consistent"] else f"{e['tokens_agreement_baseline']:.0%}",
        )
    console = harness.show(t, width=240)
    sm = report.get("summary") or {}
    if sm:

        def f(x: float | None, fmt: str = "{:.2f}x") -> str:
            return "n/a" if x is None else fmt.format(x)

        def v(b: bool | None) -> str:
            return harness.pass_fail(b, none="n/a")

        p = sm["pass"]
        b16 = sm["best"]["bf16"]
        console.print(
            "targets: "
            f"bf16 best {f(b16 and b16['fraction_of_link_ceiling'], '{:.1%}')} of link ceiling (>= 90%: {v(p['bf16_link'])}); "
            f"bf16/accelerate at the same budget {f(sm['bf16_vs_accelerate_same_budget'])} (>= 3x: {v(p['bf16_vs_accelerate'])}); "
            f"int8/bf16 {f(sm['int8_vs_bf16_best'])} (>= 1.8x: {v(p['int8_vs_bf16'])}); "
            f"int4/bf16 {f(sm['int4_vs_bf16_best'])} (>= 3x: {v(p['int4_vs_bf16'])}); "
            + "; ".join(
                f"hybrid/streaming {k} {f(r)} (>= {TARGET_HYBRID:g}x: {v(p.get('hybrid_' + k))}, "
                f"prompt pass {f(sm['hybrid_prompt_pass_vs_streaming'][k])} of streaming's time)"
                for k, r in sm["hybrid_vs_streaming_same_budget"].items()
            )
        )
    pinned = report.get("host_pinned_end")
    if pinned:
        console.print(f"pinned host memory (torch host allocator): {pinned}")
    for note in report.get("engine_notes") or []:
        console.print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
