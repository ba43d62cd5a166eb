"""GPU check: a ~7B Llama streamed by torus-sparse against the same model fully resident.

One command, no network, about 2-3 minutes on one H100/H200 (budgeted for under 5):

    python3 benchmarks/gpu_check.py            # the real check (needs CUDA)
    python3 benchmarks/gpu_check.py --tiny     # same script, tiny model; runs on the CPU too

Phases, all on ONE host model (no deepcopy; host RAM holds one copy plus the pinned store):

 1. Build: a random-init LlamaForCausalLM (hidden 4096, intermediate 11008, 32 layers, 32 heads,
    vocab 32000: 6.74 B parameters, 13.5 GB in bf16). The module tree is built with no storage
    (accelerate's `init_empty_weights`, so only the rotary buffers are real), then every parameter
    is created directly in bf16 on the host: `torch.manual_seed(seed)`, then `normal_(0, 0.02)` per
    matrix in `named_parameters()` order and ones for the RMSNorm weights. No float32 copy, no
    transformers default init (which would cost minutes on the CPU).
 2. Link: pinned host->device bandwidth. A pinned 1 GiB uint8 buffer is copied into a device
    buffer with `non_blocking=True` on a side stream, timed with CUDA events on that stream; one
    warm-up, best of 5. The same is done for one FFN layer's bytes (the engine's transfer unit).
    Without CUDA (`--tiny` on the CPU) a host memcpy of the same sizes is timed instead.
 3. Baseline: `model.to("cuda")` (everything resident), logits of a fixed 32-token prompt, a
    short warm-up generation, then the timed decode; peak memory; `model.to("cpu")`.
 4. Streamed, for each lookahead in --lookaheads (default 1,2,3): `attach(model, transport="cuda",
    vram_budget=B)` where B is computed from the model's own sizes so that exactly
    --resident-ffn (default 4) FFN layers fit:
        B = non-FFN bytes + KV reserve (kv_reserve_tokens x KV bytes/token)
            + (lookahead + 1) ring slots x layer bytes + resident_ffn x layer bytes + layer/2 slack
    (the engine's planner then keeps 4 layers resident, spread over the depth, and streams 28;
    the plan actually chosen is recorded). Logits of the prompt are compared with the baseline's
    (`torch.equal`, and max |diff|), then warm-up, `reset_stats()`, the timed decode, stats, peak
    memory, `detach(model)` (weights go back to the host, bit for bit).

Timed decode (both phases): greedy, batch 1, KV cache, `generate(max_new_tokens = min_new_tokens
= steps + 1)`. A logits processor, called once per new token right after that token's forward
pass, synchronises the *compute* stream (`torch.cuda.current_stream().synchronize()`, not the
whole device, so the engine's copy stream keeps running) and reads `time.perf_counter()`.
decode tok/s = steps / (t[steps] - t[0]): prefill excluded, every decode step included.
generate() already synchronises the host with the compute stream once per token (its stopping
check reads a device tensor), so this adds no new wait.

Reported per streamed run: decode tok/s; bytes streamed per token = bytes_moved / forward_passes
(engine counters, reset after warm-up); link ceiling tok/s = pinned bandwidth (1 GiB copy) /
bytes per token; % of link ceiling (target: >= 90%); the tighter bound
min(link ceiling, baseline tok/s) and % of it; peak `torch.cuda.max_memory_allocated` (reset
before each phase) against the budget; hit rate; stall per token; logits equality; whether the
greedy tokens equal the baseline's; attach/detach seconds; pinned host memory
(`torch.cuda.host_memory_stats()`) against the engine's host store bytes.

Output: a table on stdout, JSON at --out, else $OUT/gpu_check.json when OUT is set, else
benchmarks/results/gpu_check.json (gpu_check_tiny.json with --tiny). The JSON is rewritten after
every phase, so a run cut off by a time limit still leaves what it measured. Exit status is 0
whether or not targets are met; non-zero only if the script itself fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_LINK_FRACTION = 0.90
GiB = 2**30

FULL = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8, vocab_size=1024)


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def default_out(tiny: bool) -> Path:
    name = "gpu_check_tiny.json" if tiny else "gpu_check.json"
    out = os.environ.get("OUT")
    return Path(out) / name if out else HERE / "results" / name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def host_pinned_stats() -> dict[str, Any] | None:
    """Pinned host memory held by PyTorch's host allocator (None where unavailable)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        s = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - informational only
        return None
    keep = (
        "allocated_bytes.current",
        "allocated_bytes.peak",
        "active_bytes.current",
        "num_host_alloc",
        "host_alloc_time.total",
    )
    out = {k: v for k, v in s.items() if k in keep}
    return out or {k: v for k, v in s.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- model
def build_model(dims: dict[str, int], seed: int, std: float = 0.02) -> nn.Module:
    """A LlamaForCausalLM with deterministic random bf16 weights, made without a float32 pass."""
    from accelerate import init_empty_weights
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
    with init_empty_weights():  # parameters on `meta`, buffers (rotary inv_freq) real
        model = LlamaForCausalLM(cfg)
    torch.manual_seed(seed)
    for _, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if p.ndim == 1:  # RMSNorm weights (Llama has no biases)
                t.fill_(1.0)
            else:
                t.normal_(0.0, std)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {name} was left on the meta device")
    model.config.dtype = torch.bfloat16
    model.eval()
    return model


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


# --------------------------------------------------------------------------- bandwidth
def fill_random_bytes(buf: torch.Tensor, chunk: int = 2**20) -> None:
    """Random bytes, cheaply: one random 1 MiB block repeated (content does not change copy speed,
    but a non-constant pattern makes the spot check of the copied bytes meaningful)."""
    block = torch.randint(0, 256, (chunk,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    n = buf.numel() // chunk * chunk
    if n:
        buf[:n].view(-1, chunk).copy_(block.expand(n // chunk, chunk))
    if buf.numel() > n:
        buf[n:].copy_(block[: buf.numel() - n])


def empty_pinned_cache() -> bool:
    """Return cached pinned blocks to the driver (names differ across torch versions; best effort),
    so the pinned-memory figures read later show the engine's store, not this test's buffer."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            try:
                fn()
                return True
            except Exception:  # noqa: BLE001 - informational only
                pass
    return False


def link_bandwidth(device: torch.device, sizes: dict[str, int], reps: int = 5) -> dict[str, Any]:
    """Best-of-`reps` host->device bandwidth per named size (CUDA: pinned, events, side stream)."""
    biggest = max(sizes.values())
    out: dict[str, Any] = {}
    if device.type == "cuda":
        host = torch.empty(biggest, dtype=torch.uint8, pin_memory=True)
        fill_random_bytes(host)
        dev = torch.empty(biggest, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device=device)
        for name, n in sizes.items():
            times = []
            for i in range(reps + 1):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    e0.record(stream)
                    dev[:n].copy_(host[:n], non_blocking=True)
                    e1.record(stream)
                e1.synchronize()
                if i:  # the first is a warm-up
                    times.append(e0.elapsed_time(e1) / 1e3)
            ok = torch.equal(dev[:4096].cpu(), host[:4096]) and torch.equal(dev[n - 4096 : n].cpu(), host[n - 4096 : n])
            out[name] = {"bytes": n, "best_s": min(times), "GBps": n / min(times) / 1e9, "all_s": times, "verified": ok}
        out["method"] = (
            "pinned host -> device, copy_(non_blocking=True) on a side stream, CUDA events, best of %d" % reps
        )
        del host, dev
        torch.cuda.synchronize(device)
        out["pinned_cache_emptied"] = empty_pinned_cache()
    else:
        src = torch.empty(biggest, dtype=torch.uint8)
        fill_random_bytes(src)
        dst = torch.empty_like(src)
        for name, n in sizes.items():
            times = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                dst[:n].copy_(src[:n])
                t = time.perf_counter() - t0
                if i:
                    times.append(t)
            out[name] = {
                "bytes": n,
                "best_s": min(times),
                "GBps": n / min(times) / 1e9,
                "all_s": times,
                "verified": True,
            }
        out["method"] = "no CUDA: host memcpy (Tensor.copy_), perf_counter, best of %d" % reps
    return out


# --------------------------------------------------------------------------- decode
class StepClock:
    """Logits processor: per new token, wait for the compute stream, then take the time."""

    def __init__(self, device: torch.device) -> None:
        self.times: list[float] = []
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.current_stream(device).synchronize()) if device.type == "cuda" else (lambda: None)
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._sync()
        self.times.append(time.perf_counter())
        return scores


def decode(model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    n = steps + 1
    clock = StepClock(device)
    with torch.inference_mode():
        sync(device)
        t_enter = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )
        sync(device)
        t_exit = time.perf_counter()
    t = clock.times
    new = out[0, ids.shape[1] :].tolist()
    if len(t) != n or len(new) != n:
        raise RuntimeError(f"expected {n} tokens and timestamps, got {len(new)} and {len(t)}")
    decode_s = t[-1] - t[0]
    return {
        "tokens": new,
        "decode_steps": steps,
        "decode_s": decode_s,
        "tok_per_s": steps / decode_s,
        "ms_per_token": decode_s * 1e3 / steps,
        "prefill_s": t[0] - t_enter,
        "generate_wall_s": t_exit - t_enter,
    }


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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
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
        default=270.0,
        help="skip a streamed run whose predicted duration would end the script after this (default 270)",
    )
    ap.add_argument("--lookaheads", default="1,2,3", help="comma-separated lookaheads for the streamed runs")
    ap.add_argument(
        "--resident-ffn",
        type=int,
        default=None,
        help="FFN layers the computed budget keeps resident (default 4; tiny 2)",
    )
    ap.add_argument(
        "--kv-reserve-tokens", type=int, default=4096, help="TorusConfig.kv_reserve_tokens (counted in the budget)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import transformers

    import torus_plugins as tp
    from torus_plugins import TorusConfig

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        print(
            "gpu_check: CUDA is not available; the full check needs a GPU (use --tiny to smoke-test on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu")
    transport = "cuda" if has_cuda else "copy"
    dims = TINY if args.tiny else FULL
    resident_ffn = args.resident_ffn if args.resident_ffn is not None else (2 if args.tiny else 4)
    lookaheads = [int(x) for x in args.lookaheads.split(",") if x.strip()]
    out_path = args.out or default_out(args.tiny)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_script = time.perf_counter()

    report: dict[str, Any] = {
        "benchmark": "gpu_check" + ("_tiny" if args.tiny else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if has_cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if has_cuda else None,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "torus_sparse": tp.__version__,
            "torus_sparse_from": str(Path(tp.__file__).parent),
        },
        "settings": {
            "tiny": args.tiny,
            "dims": dims,
            "dtype": "bfloat16",
            "transport": transport,
            "decode_steps": args.decode_steps,
            "warmup_tokens": args.warmup_tokens,
            "repeats": args.repeats,
            "max_seconds": args.max_seconds,
            "lookaheads": lookaheads,
            "resident_ffn_in_budget": resident_ffn,
            "kv_reserve_tokens": args.kv_reserve_tokens,
            "prompt_tokens": args.prompt_tokens,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "target": f"streamed decode tok/s >= {TARGET_LINK_FRACTION:.0%} of link ceiling (pinned bandwidth / bytes per token)",
        "phases": {},
        "errors": [],
    }

    def save() -> None:
        report["wall_s"] = time.perf_counter() - t_script
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    # 1. build -----------------------------------------------------------------
    log(f"device {report['device']}; torch {torch.__version__}, transformers {transformers.__version__}")
    t0 = time.perf_counter()
    model = build_model(dims, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    layer_bytes, non_ffn = ffn_and_non_ffn_bytes(model)
    n_layers = dims["num_hidden_layers"]
    kv_tok = kv_bytes_per_token(model)
    report["model"] = {
        "parameters": n_params,
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "ffn_layer_bytes": layer_bytes,
        "ffn_total_bytes": layer_bytes * n_layers,
        "non_ffn_bytes": non_ffn,
        "kv_bytes_per_token": kv_tok,
        "build_s": time.perf_counter() - t0,
    }
    log(
        f"built {n_params / 1e9:.2f} B params ({fmt_bytes(report['model']['bytes'])}) in {report['model']['build_s']:.1f} s; "
        f"FFN layer {fmt_bytes(layer_bytes)}, non-FFN {fmt_bytes(non_ffn)}"
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    ids_cpu = torch.randint(3, dims["vocab_size"], (1, args.prompt_tokens), generator=g)
    save()

    # 2. link bandwidth ---------------------------------------------------------
    big = GiB if has_cuda else 256 * 2**20
    bw = link_bandwidth(device, {"1GiB" if has_cuda else "256MiB": big, "ffn_layer": layer_bytes})
    report["bandwidth"] = bw
    link_Bps = bw["1GiB" if has_cuda else "256MiB"]["GBps"] * 1e9
    log(f"link: {bw['method']}: big {link_Bps / 1e9:.2f} GB/s, one FFN layer {bw['ffn_layer']['GBps']:.2f} GB/s")
    free_device_memory(device)
    save()

    ids = ids_cpu.to(device)

    # 3. baseline ---------------------------------------------------------------
    t0 = time.perf_counter()
    model.to(device)
    sync(device)
    to_dev_s = time.perf_counter() - t0
    if has_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ref_logits = prompt_logits(model, ids, device)
    report["model"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    report["model"]["baseline_logits_finite"] = bool(torch.isfinite(ref_logits.float()).all())
    decode(model, ids, args.warmup_tokens, device)
    base = timed_decodes(model, ids, args.decode_steps, args.repeats, device)
    base.update(peak_allocated=peak_allocated(device), peak_reserved=peak_reserved(device), to_device_s=to_dev_s)
    report["phases"]["baseline"] = base
    log(
        f"baseline: {base['tok_per_s']:.2f} tok/s ({base['ms_per_token']:.2f} ms/token), peak {fmt_bytes(base['peak_allocated'])}"
    )
    t0 = time.perf_counter()
    model.to("cpu")
    base["to_host_s"] = time.perf_counter() - t0
    free_device_memory(device)
    save()

    # 4. streamed ---------------------------------------------------------------
    last_run_s: float | None = None
    for la in lookaheads:
        name = f"torus_la{la}"
        # Time guard: predict this run from the last one (or from the link speed) and skip it
        # rather than be killed by the caller's time limit with nothing written.
        tokens_streamed = args.warmup_tokens + args.repeats * (args.decode_steps + 1) + 1
        predicted = last_run_s or (tokens_streamed * n_layers * layer_bytes / link_Bps * 1.3 + 20.0)
        elapsed = time.perf_counter() - t_script
        if elapsed + predicted > args.max_seconds:
            report["phases"][name] = {
                "lookahead": la,
                "skipped": f"time guard: {elapsed:.0f} s elapsed + "
                f"{predicted:.0f} s predicted > --max-seconds {args.max_seconds:.0f}",
            }
            log(f"{name} skipped: {report['phases'][name]['skipped']}")
            save()
            continue
        t_run = time.perf_counter()
        kv_reserve = kv_tok * args.kv_reserve_tokens
        budget = non_ffn + kv_reserve + (la + 1 + resident_ffn) * layer_bytes + layer_bytes // 2
        cfg = TorusConfig(
            transport=transport,
            device=str(device),
            vram_budget=budget,
            lookahead=la,
            kv_reserve_tokens=args.kv_reserve_tokens,
        )
        entry: dict[str, Any] = {
            "lookahead": la,
            "vram_budget": budget,
            "budget_formula": (
                "non_ffn + kv_reserve_tokens*kv_bytes_per_token + (lookahead+1+resident_ffn)*ffn_layer_bytes + ffn_layer_bytes/2"
            ),
        }
        report["phases"][name] = entry
        try:
            free_device_memory(device)
            t0 = time.perf_counter()
            eng = tp.attach(model, cfg)
            sync(device)
            entry["attach_s"] = time.perf_counter() - t0
            entry["plan"] = {
                "resident": list(eng.plan.resident),
                "streamed": list(eng.plan.streamed),
                "n_slots": eng.plan.n_slots,
                "slot_bytes": eng.plan.slot_bytes,
                "planned_device_bytes": eng.plan.device_bytes(eng.layer_bytes),
            }
            entry["host_pinned_after_attach"] = host_pinned_stats()
            got = prompt_logits(model, ids, device)
            entry["logits"] = compare(ref_logits, got)
            decode(model, ids, args.warmup_tokens, device)
            eng.reset_stats()
            res = timed_decodes(model, ids, args.decode_steps, args.repeats, device)
            st = eng.stats()
            entry.update(res)
            entry["tokens_equal_baseline"] = res["tokens"] == base["tokens"]
            entry["peak_allocated"] = peak_allocated(device)
            entry["planned_device_bytes"] = entry["plan"]["planned_device_bytes"]
            entry["peak_reserved"] = peak_reserved(device)
            entry["within_budget"] = None if entry["peak_allocated"] is None else entry["peak_allocated"] <= budget
            bpt = st.bytes_moved / st.forward_passes if st.forward_passes else 0.0
            ceiling = link_Bps / bpt if bpt else float("inf")
            bound = min(ceiling, base["tok_per_s"])
            entry.update(
                bytes_per_token=bpt,
                link_ceiling_tok_per_s=ceiling,
                fraction_of_link_ceiling=res["tok_per_s"] / ceiling,
                bound_tok_per_s=bound,
                fraction_of_bound=res["tok_per_s"] / bound,
                target_pass=res["tok_per_s"] / ceiling >= TARGET_LINK_FRACTION,
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
            t0 = time.perf_counter()
            tp.detach(model)
            entry["detach_s"] = time.perf_counter() - t0
            del eng
        except Exception as exc:  # noqa: BLE001 - record, keep the model usable, go on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            report["errors"].append({name: traceback.format_exc()})
            log(f"{name} FAILED: {entry['error']}")
            if tp.is_attached(model):
                tp.detach(model)
        free_device_memory(device)
        last_run_s = time.perf_counter() - t_run
        entry["run_s"] = last_run_s
        save()

    report["host_pinned_end"] = host_pinned_stats()
    save()
    print_table(report, link_Bps)
    log(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    return 0


def print_table(report: dict[str, Any], link_Bps: float) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    bw = report["bandwidth"]
    title = (
        f"{report['device']}: Llama {report['model']['parameters'] / 1e9:.2f} B bf16, batch 1, "
        f"{s['decode_steps']} decode steps, median of {s['repeats']}; link {link_Bps / 1e9:.1f} GB/s "
        f"(one FFN layer {bw['ffn_layer']['GBps']:.1f} GB/s)"
    )
    t = Table(title=title)
    cols = (
        "run",
        "tok/s",
        "ms/tok",
        "resident/streamed",
        "bytes/tok",
        "ceiling tok/s",
        "% ceiling",
        "≥90%",
        "% min(ceil,base)",
        "hit",
        "stall ms/tok",
        "peak / budget",
        "logits equal (max|Δ|)",
        "tokens = base",
    )
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    for name, e in report["phases"].items():
        if "skipped" in e:
            t.add_row(name, "skipped", e["skipped"][:60], *[""] * (len(cols) - 3))
            continue
        if "error" in e:
            t.add_row(name, "ERROR", e["error"][:60], *[""] * (len(cols) - 3))
            continue
        if name == "baseline":
            n = report["settings"]["dims"]["num_hidden_layers"]
            t.add_row(
                name,
                f"{e['tok_per_s']:.2f}",
                f"{e['ms_per_token']:.1f}",
                f"{n}/0",
                "0",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"{fmt_bytes(e['peak_allocated'])} / -",
                "reference",
                "reference",
            )
            continue
        if e["peak_allocated"] is None:  # CPU: no allocator peak; show the engine's planned bytes
            peak = f"plan {fmt_bytes(e['planned_device_bytes'])} / {fmt_bytes(e['vram_budget'])}"
        else:
            peak = f"{fmt_bytes(e['peak_allocated'])} / {fmt_bytes(e['vram_budget'])}"
        t.add_row(
            f"{name}",
            f"{e['tok_per_s']:.2f}",
            f"{e['ms_per_token']:.1f}",
            f"{len(e['plan']['resident'])}/{len(e['plan']['streamed'])}",
            fmt_bytes(e["bytes_per_token"]),
            f"{e['link_ceiling_tok_per_s']:.2f}",
            f"{e['fraction_of_link_ceiling']:.1%}",
            "PASS" if e["target_pass"] else "FAIL",
            f"{e['fraction_of_bound']:.1%}",
            f"{e['hit_rate']:.1%}",
            f"{e['stall_ms_per_token']:.1f}",
            peak,
            f"{'yes' if e['logits']['equal'] else 'NO'} ({e['logits']['max_abs_diff']:.3g})",
            "yes" if e["tokens_equal_baseline"] and e["tokens_consistent"] else "NO",
        )
    Console(width=240).print(t)
    pinned = report.get("host_pinned_end")
    if pinned:
        print(f"pinned host memory (torch host allocator): {pinned}")


if __name__ == "__main__":
    sys.exit(main())
