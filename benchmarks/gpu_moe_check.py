"""GPU MoE check: routed experts of an OLMoE-shaped model streamed by torus-sparse through the
device expert cache, against the same model fully resident (eager experts).

One command, no network, about 1-2 minutes on one H100/H200 (guarded to --max-seconds, 150 s):

    python3 benchmarks/gpu_moe_check.py            # the real check (needs CUDA)
    python3 benchmarks/gpu_moe_check.py --tiny     # same logic, tiny config, on the CPU (seconds)

Model: a random-init `OlmoeForCausalLM` with OLMoE-1B-7B's per-layer shape in bf16 (hidden 2048,
64 experts, top-8, expert intermediate 1024, 16 heads MHA, vocab 50304, untied head) but only
--layers (4) of its 16 decoder layers, so that building it on the host takes seconds. Every
per-layer figure is the real model's; per-token bytes, stall and tok/s cover --layers MoE layers
(a 16-layer model moves about 16/layers times the expert bytes per token). Built as gpu_check.py
builds its Llama: module tree with no storage (`accelerate.init_empty_weights`), then each
parameter made directly in bf16 (`manual_seed`, `normal_(0, 0.02)`, ones for the norms), with
`config._experts_implementation = "eager"`.

Phases (one host model; no copies beyond the engine's host store):
 1. Link: pinned host->device bandwidth: a pinned 256 MiB buffer (and one expert's bytes, the
    engine's transfer unit) copied with `non_blocking=True` on a side stream, CUDA events, one
    warm-up, best of 5. Without CUDA (--tiny) a host memcpy is timed instead.
 2. Baseline: `model.to("cuda")`, everything resident, eager experts; the run below; back to CPU.
 3. Streamed, transport "cuda", lookahead --lookahead (1), shared LRU cache: cache of a quarter
    and of half of all experts x predictor none / speculative; then int8 (`weight_quant="int8"`)
    at half the experts with the speculative predictor. After the int8 run, detach() leaves the
    dequantized experts in the model (documented); the resident baseline is rerun on them as the
    int8 run's exact reference, then the original host tensors are re-bound.

The run (every phase): a warm-up (another prompt, --warmup-tokens steps), then the fixed
--prompt-tokens prompt's prefill (its logits are the "prompt logits"), `reset_stats()` (so the
engine's counters cover decoding only), and --tokens greedy decode steps with the KV cache, timed
between `torch.cuda.synchronize()` calls (wall clock; CUDA events on the compute stream are
recorded too). Each step's last-position logits are kept and compared with the reference run's.
decode tok/s = steps / decode seconds; bytes/token = expert bytes_moved / forward passes; link
ceiling = pinned bandwidth / bytes per token; wasted share = bytes of prefetched experts evicted
unused / bytes moved; stall = time compute waited for an expert copy; peak = max_memory_allocated
over prefill and decode (CPU: the engine's planned device bytes).

Expected: streamed bf16 tokens and logits bit-equal to the baseline (same eager arithmetic on the
same device); the int8 run bit-equal to the resident run on its dequantized weights.

Output: a table, and JSON at --out, else $OUT/gpu_moe_check.json when OUT is set, else
benchmarks/results/gpu_moe_check.json (`_tiny` with --tiny), rewritten after every phase. Every
variant is guarded: a failure is recorded in the JSON and the rest still run; a variant whose
predicted duration would end the script after --max-seconds is skipped, saying so. Exit status 0
whether or not the checks pass; non-zero only if the script itself fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `past_key_values=` is deprecated in newer transformers (5.24) but is what the device's (5.17) knows
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The dense check's helpers: logging, byte formatting, device sync/memory and the pinned
# host->device bandwidth probe (both checks measure the link the same way).
from gpu_check import (  # noqa: E402
    _version,
    fmt_bytes,
    free_device_memory,
    link_bandwidth,
    log,
    peak_allocated,
    sync,
)

HERE = Path(__file__).resolve().parent
MiB = 2**20
OLMOE_LAYERS = 16  # OLMoE-1B-7B's decoder layers
FULL = dict(
    hidden_size=2048,
    intermediate_size=1024,
    num_experts=64,
    num_experts_per_tok=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=50304,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
)


# --------------------------------------------------------------------------- helpers
def default_out(tiny: bool) -> Path:
    name = "gpu_moe_check_tiny.json" if tiny else "gpu_moe_check.json"
    out = os.environ.get("OUT")
    return Path(out) / name if out else HERE / "results" / name


# --------------------------------------------------------------------------- model
def build_model(dims: dict[str, int], layers: int, seed: int, std: float = 0.02) -> nn.Module:
    """An OlmoeForCausalLM with deterministic random bf16 weights, eager experts, no float32 pass."""
    from accelerate import init_empty_weights
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        **dims,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        norm_topk_prob=False,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=50279 if dims["vocab_size"] > 50279 else 0,
    )
    cfg._experts_implementation = "eager"
    with init_empty_weights():  # parameters on `meta`, buffers (rotary inv_freq) real
        model = OlmoeForCausalLM(cfg)
    torch.manual_seed(seed)
    for _, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if p.ndim == 1:  # RMSNorm weights (q/k norms included; OLMoE has no biases)
                t.fill_(1.0)
            else:
                t.normal_(0.0, std)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {name} was left on the meta device")
    model.config.dtype = torch.bfloat16
    if getattr(model.config, "_experts_implementation", None) != "eager":
        model.set_experts_implementation("eager")
    model.eval()
    return model


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.model.layers for p in layer.mlp.experts.parameters(recurse=False)]


# --------------------------------------------------------------------------- bandwidth
# --------------------------------------------------------------------------- the run
@torch.inference_mode()
def greedy_run(
    model: nn.Module,
    ids: torch.Tensor,
    warm_ids: torch.Tensor,
    steps: int,
    warm_steps: int,
    device: torch.device,
    engine: Any = None,
) -> dict[str, Any]:
    """Warm-up, prompt logits (prefill), reset counters, `steps` timed greedy decode steps."""

    def forward(x: torch.Tensor, past: Any) -> Any:
        return model(input_ids=x, past_key_values=past, use_cache=True)

    out = forward(warm_ids, None)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(warm_steps):
        out = forward(nxt, past)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del out, past
    free_device_memory(device)  # also resets the peak

    sync(device)
    t0 = time.perf_counter()
    out = forward(ids, None)
    sync(device)
    prefill_s = time.perf_counter() - t0
    prompt_logits = out.logits[0].detach().cpu()
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del out
    peak_prefill = peak_allocated(device)
    if engine is not None:
        engine.reset_stats()  # decode-only counters (also resets the CUDA peak)
    tokens, step_logits = [nxt], []
    cuda = device.type == "cuda"
    if cuda:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    t0 = time.perf_counter()
    if cuda:
        e0.record()
    for _ in range(steps):
        out = forward(nxt, past)
        past = out.past_key_values
        last = out.logits[:, -1]
        nxt = last.argmax(-1, keepdim=True)
        step_logits.append(last)
        tokens.append(nxt)
    if cuda:
        e1.record()
    sync(device)
    decode_s = time.perf_counter() - t0
    peak_decode = peak_allocated(device)
    res = {
        "tokens": torch.cat(tokens, dim=1)[0].tolist(),
        "decode_steps": steps,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_s_cuda_events": e0.elapsed_time(e1) / 1e3 if cuda else None,
        "tok_per_s": steps / decode_s,
        "ms_per_token": decode_s * 1e3 / steps,
        "peak_allocated": None if peak_prefill is None else max(peak_prefill, peak_decode or 0),
        "peak_allocated_decode": peak_decode,
    }
    res["_prompt_logits"] = prompt_logits
    res["_step_logits"] = torch.cat(step_logits, dim=0).cpu()
    return res


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Tokens and logits of `got` against `ref` (both greedy_run results)."""

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    pa, pb = ref["_prompt_logits"], got["_prompt_logits"]
    sa, sb = ref["_step_logits"], got["_step_logits"]
    same = [a == b for a, b in zip(ref["tokens"], got["tokens"])]
    first_diff = next((i for i, s in enumerate(same) if not s), None)
    return {
        "tokens_equal": ref["tokens"] == got["tokens"],
        "tokens_agreement": sum(same) / len(same),
        "first_differing_token": first_diff,
        "prompt_logits_equal": bool(torch.equal(pa, pb)),
        "prompt_logits_max_abs_diff": diff(pa, pb),
        "prompt_top1_agreement": float((pa.argmax(-1) == pb.argmax(-1)).float().mean()),
        # step logits after the first differing token come from different inputs
        "decode_logits_equal": bool(torch.equal(sa, sb)),
        "decode_logits_max_abs_diff": diff(sa, sb),
        "logits_max_abs_diff": max(diff(pa, pb), diff(sa, sb)),
    }


def public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def resident_run(model: nn.Module, args: Any, ids: torch.Tensor, warm: torch.Tensor, device: torch.device) -> dict:
    """The whole model on the device, eager experts: the reference run; the model goes back after."""
    t0 = time.perf_counter()
    model.to(device)
    sync(device)
    to_dev_s = time.perf_counter() - t0
    try:
        res = greedy_run(model, ids, warm, args.tokens, args.warmup_tokens, device)
    finally:
        t0 = time.perf_counter()
        model.to("cpu")
        to_host_s = time.perf_counter() - t0
        free_device_memory(device)
    res.update(to_device_s=to_dev_s, to_host_s=to_host_s)
    return res


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (hidden 64, 8 experts, top-2, 2 layers); CPU ok")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 of OLMoE's 16; tiny 2)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy decode steps timed (default 32)")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="decode steps of the untimed warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--lookahead", type=int, default=1, help="MoE layers predicted ahead (default 1)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 run")
    ap.add_argument("--max-seconds", type=float, default=150.0, help="skip variants that would end after this (150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import transformers

    import torus_plugins as tp
    from torus_adapters.moe_architectures import moe_info

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        print("gpu_moe_check: CUDA is not available; use --tiny to smoke-test on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu")
    transport = "cuda" if has_cuda else "copy"
    dims = TINY if args.tiny else FULL
    layers = args.layers or (2 if args.tiny else 4)
    out_path = args.out or default_out(args.tiny)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_script = time.perf_counter()
    reduction = (
        "tiny config (not OLMoE-shaped): smoke test of the logic; speed numbers mean nothing"
        if args.tiny
        else f"OLMoE-1B-7B per-layer shapes, {layers} of its {OLMOE_LAYERS} decoder layers: per-token expert "
        f"bytes, stall and tok/s cover {layers} MoE layers (the full model moves ~{OLMOE_LAYERS / layers:g}x the "
        f"expert bytes per token); random init, so routing is near-uniform (a pessimistic case for caches "
        f"and predictors)"
    )
    report: dict[str, Any] = {
        "benchmark": "gpu_moe_check" + ("_tiny" if args.tiny else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if has_cuda else f"cpu ({platform.machine()})",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if has_cuda else None,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "accelerate": _version("accelerate"),
            "torus_sparse": tp.__version__,
            "torus_sparse_from": str(Path(tp.__file__).parent),
        },
        "model_reduction": reduction,
        "settings": {
            "tiny": args.tiny,
            "dims": dims,
            "layers": layers,
            "dtype": "bfloat16",
            "experts_implementation": "eager",
            "transport": transport,
            "lookahead": args.lookahead,
            "cache_scope": "shared",
            "eviction": "lru",
            "decode_steps": args.tokens,
            "warmup_tokens": args.warmup_tokens,
            "prompt_tokens": args.prompt_tokens,
            "max_seconds": args.max_seconds,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "phases": {},
        "errors": [],
    }

    def save() -> None:
        report["wall_s"] = time.perf_counter() - t_script
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    try:
        # 1. build + link -------------------------------------------------------------
        log(f"device {report['device']}; torch {torch.__version__}, transformers {transformers.__version__}")
        log(f"model: {reduction}")
        t0 = time.perf_counter()
        model = build_model(dims, layers, args.seed)
        info = moe_info(model)
        total_experts = info["moe_layers"] * info["experts"]
        n_params = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        expert_total = sum(p.numel() * p.element_size() for p in expert_params(model))
        report["model"] = {
            "class": type(model).__name__,
            "parameters": n_params,
            "bytes": model_bytes,
            "expert_bytes_total": expert_total,
            "non_expert_bytes": model_bytes - expert_total,
            **info,
            "total_experts": total_experts,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "build_s": time.perf_counter() - t0,
        }
        log(
            f"built {n_params / 1e6:.1f} M params ({fmt_bytes(model_bytes)}) in {report['model']['build_s']:.1f} s: "
            f"{info['moe_layers']} MoE layers x {info['experts']} experts (top-{info['top_k']}), "
            f"{fmt_bytes(info['expert_bytes'])} per expert, experts {fmt_bytes(expert_total)}"
        )
        save()
        big = 256 * MiB
        bw = link_bandwidth(device, {"256MiB": big, "expert": info["expert_bytes"]})
        report["bandwidth"] = bw
        link_Bps = bw["256MiB"]["GBps"] * 1e9
        log(f"link: {bw['method']}: 256 MiB {link_Bps / 1e9:.2f} GB/s, one expert {bw['expert']['GBps']:.2f} GB/s")
        free_device_memory(device)
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(3, dims["vocab_size"], (1, args.prompt_tokens), generator=g).to(device)
        warm = torch.randint(3, dims["vocab_size"], (1, args.prompt_tokens), generator=g).to(device)
        save()

        # 2. baseline -------------------------------------------------------------------
        base = resident_run(model, args, ids, warm, device)
        report["phases"]["baseline"] = {"kind": "resident", **public(base)}
        report["model"]["baseline_logits_finite"] = bool(torch.isfinite(base["_prompt_logits"].float()).all())
        log(
            f"baseline: {base['tok_per_s']:.2f} tok/s ({base['ms_per_token']:.2f} ms/token), "
            f"peak {fmt_bytes(base['peak_allocated'])}"
        )
        save()
    except Exception as exc:  # noqa: BLE001 - nothing to compare against: record, stop
        report["fatal"] = f"{type(exc).__name__}: {exc}"
        report["errors"].append({"setup": traceback.format_exc()})
        save()
        log(f"FAILED before the streamed runs: {report['fatal']}")
        traceback.print_exc()
        return 1

    # 3. streamed -------------------------------------------------------------------
    top_k = info["top_k"]
    quarter, half = max(top_k, total_experts // 4), max(top_k, total_experts // 2)
    variants = [
        (f"cache{share}_{pred}", n, share, pred, None)
        for share, n in ((25, quarter), (50, half))
        for pred in ("none", "speculative")
    ]
    if not args.no_int8:
        variants.append(("cache50_speculative_int8", half, 50, "speculative", "int8"))
    originals = [(p, p.data) for p in expert_params(model)]
    last_s: float | None = None
    for name, n_cache, share, pred, quant in variants:
        elapsed = time.perf_counter() - t_script
        predicted = (last_s or 20.0) * (2.5 if quant else 1.0)
        entry: dict[str, Any] = {
            "kind": "streamed",
            "cache_experts": n_cache,
            "cache_share": share / 100,
            "predictor": pred,
            "weight_quant": quant,
            "lookahead": args.lookahead,
        }
        report["phases"][name] = entry
        if elapsed + predicted > args.max_seconds:
            entry["skipped"] = (
                f"time guard: {elapsed:.0f} s elapsed + {predicted:.0f} s predicted > --max-seconds {args.max_seconds:.0f}"
            )
            log(f"{name} skipped: {entry['skipped']}")
            save()
            continue
        t_run = time.perf_counter()
        eng = None
        try:
            free_device_memory(device)
            cfg = tp.TorusConfig(
                transport=transport,
                device=str(device),
                lookahead=args.lookahead,
                moe_cache_experts=n_cache,
                moe_predictor=pred,
                moe_eviction="lru",
                moe_cache_scope="shared",
                weight_quant=quant,
            )
            t0 = time.perf_counter()
            eng = tp.attach(model, cfg)
            sync(device)
            entry["attach_s"] = time.perf_counter() - t0
            res = greedy_run(model, ids, warm, args.tokens, args.warmup_tokens, device, eng)
            st = eng.stats()
            ex = st.experts
            entry.update(public(res))
            entry["vs_baseline"] = compare(base, res)
            passes = ex.forward_passes or args.tokens
            tot = ex.totals()
            bpt = ex.bytes_moved / passes
            ceiling = link_Bps / bpt if bpt else None
            entry.update(
                cache_experts_engine=ex.cache_experts,
                total_experts=ex.total_experts,
                expert_bytes_streamed=ex.expert_bytes,
                cache_bytes=ex.cache_bytes,
                prefetch_k=ex.prefetch_k,
                forward_passes=ex.forward_passes,
                hit_rate=ex.hit_rate,
                recall=ex.recall,
                loads_per_token=ex.loads / passes,
                bytes_per_token=bpt,
                wasted_share=tot["wasted_share"],
                wasted_bytes_per_token=ex.wasted_bytes / passes,
                stall_ms_per_token=ex.stall_s * 1e3 / passes,
                link_ceiling_tok_per_s=ceiling,
                fraction_of_link_ceiling=res["tok_per_s"] / ceiling if ceiling else None,
                tok_per_s_vs_baseline=res["tok_per_s"] / base["tok_per_s"],
                effective_link_GBps=bpt * res["tok_per_s"] / 1e9,
                engine_peak_device_bytes=st.peak_device_bytes,
                host_store_bytes=st.host_store_bytes,
                expert_totals=tot,
            )
            cmp = entry["vs_baseline"]
            log(
                f"{name}: {res['tok_per_s']:.2f} tok/s ({entry['tok_per_s_vs_baseline']:.2f}x base), hit {ex.hit_rate:.1%}, "
                f"recall {'-' if ex.recall is None else f'{ex.recall:.1%}'}, {fmt_bytes(bpt)}/token, "
                f"wasted {tot['wasted_share']:.1%}, stall {entry['stall_ms_per_token']:.2f} ms/token, "
                f"tokens equal {cmp['tokens_equal']}, logits max|diff| {cmp['logits_max_abs_diff']:.3g}"
            )
            t0 = time.perf_counter()
            tp.detach(model)
            eng = None
            entry["detach_s"] = time.perf_counter() - t0
            if quant is None:
                p0, d0 = originals[0]
                entry["detach_restored_weights"] = bool(torch.equal(p0.data, d0))
            else:
                # detach() left the dequantized experts: the resident run on them is the exact reference
                ref = resident_run(model, args, ids, warm, device)
                entry["dequantized_resident"] = public(ref)
                entry["vs_dequantized_resident"] = compare(ref, res)
                c = entry["vs_dequantized_resident"]
                log(
                    f"{name} vs the resident run on its dequantized weights: tokens equal {c['tokens_equal']}, "
                    f"logits max|diff| {c['logits_max_abs_diff']:.3g}"
                )
        except Exception as exc:  # noqa: BLE001 - record, keep the model usable, go on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            report["errors"].append({name: traceback.format_exc()})
            log(f"{name} FAILED: {entry['error']}")
            try:
                if tp.is_attached(model):
                    tp.detach(model)
                model.to("cpu")
            except Exception:  # noqa: BLE001
                report["errors"].append({f"{name} (cleanup)": traceback.format_exc()})
        del eng
        for p, d in originals:  # every run starts from the built weights (frees detach's copies)
            p.data = d
        free_device_memory(device)
        last_s = time.perf_counter() - t_run
        entry["run_s"] = last_s
        save()

    report["summary"] = summarize(report)
    save()
    print_table(report, link_Bps)
    log(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    return 0


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    ph = report["phases"]
    ran = {n: e for n, e in ph.items() if e.get("kind") == "streamed" and "tok_per_s" in e}
    bf16 = {n: e for n, e in ran.items() if e["weight_quant"] is None}
    quant = {n: e for n, e in ran.items() if e["weight_quant"] is not None}

    def exact(e: dict[str, Any]) -> bool:
        c = e.get("vs_dequantized_resident") if e["weight_quant"] else e["vs_baseline"]
        return bool(c and c["tokens_equal"] and c["prompt_logits_equal"] and c["decode_logits_equal"])

    return {
        "runs_ok": len(ran),
        "runs_failed": [n for n, e in ph.items() if "error" in e],
        "runs_skipped": [n for n, e in ph.items() if "skipped" in e],
        "bf16_tokens_identical_to_baseline": all(e["vs_baseline"]["tokens_equal"] for e in bf16.values())
        if bf16
        else None,
        "bf16_logits_bit_equal_to_baseline": all(exact(e) for e in bf16.values()) if bf16 else None,
        "bf16_max_abs_logit_diff": max((e["vs_baseline"]["logits_max_abs_diff"] for e in bf16.values()), default=None),
        "int8_bit_equal_to_dequantized_resident": all(exact(e) for e in quant.values()) if quant else None,
        "int8_token_agreement_with_bf16_baseline": {n: e["vs_baseline"]["tokens_agreement"] for n, e in quant.items()},
        "best_bf16_tok_per_s": max((e["tok_per_s"] for e in bf16.values()), default=None),
        "baseline_tok_per_s": ph.get("baseline", {}).get("tok_per_s"),
    }


def print_table(report: dict[str, Any], link_Bps: float) -> None:
    from rich.console import Console
    from rich.table import Table

    m, s = report["model"], report["settings"]
    title = (
        f"{report['device']}: OLMoE-shaped MoE, {s['layers']} layers x {m['experts']} experts top-{m['top_k']}, "
        f"{fmt_bytes(m['expert_bytes'])}/expert, bf16, {s['decode_steps']} decode steps, lookahead {s['lookahead']}, "
        f"transport {s['transport']}; link {link_Bps / 1e9:.1f} GB/s"
    )
    t = Table(title=title)
    cols = (
        "run",
        "cache",
        "tok/s",
        "× base",
        "hit",
        "recall",
        "bytes/tok",
        "wasted",
        "stall ms/tok",
        "ceiling tok/s",
        "% ceiling",
        "peak",
        "logits max|Δ|",
        "tokens = ref",
    )
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    for name, e in report["phases"].items():
        if "skipped" in e or "error" in e:
            what = "skipped" if "skipped" in e else "ERROR"
            t.add_row(name, str(e.get("cache_experts", "")), what, (e.get("skipped") or e["error"])[:70])
            continue
        if name == "baseline":
            t.add_row(
                name,
                "all",
                f"{e['tok_per_s']:.2f}",
                "1.00",
                *["-"] * 7,
                fmt_bytes(e["peak_allocated"]),
                "reference",
                "reference",
            )
            continue
        ref = e.get("vs_dequantized_resident") or e["vs_baseline"]
        peak = (
            fmt_bytes(e["peak_allocated"])
            if e["peak_allocated"] is not None
            else f"plan {fmt_bytes(e['engine_peak_device_bytes'])}"
        )
        tokens = "yes" if ref["tokens_equal"] else f"{ref['tokens_agreement']:.0%}"
        logits = f"{ref['logits_max_abs_diff']:.3g}"
        if e["weight_quant"]:  # against the resident run on the dequantized weights; bf16 baseline after
            tokens += f" (bf16 base {e['vs_baseline']['tokens_agreement']:.0%})"
            logits += f" (bf16 base {e['vs_baseline']['logits_max_abs_diff']:.3g})"
        t.add_row(
            name,
            f"{e['cache_experts']}/{e['total_experts']}",
            f"{e['tok_per_s']:.2f}",
            f"{e['tok_per_s_vs_baseline']:.2f}",
            f"{e['hit_rate']:.1%}",
            "-" if e["recall"] is None else f"{e['recall']:.1%}",
            fmt_bytes(e["bytes_per_token"]),
            f"{e['wasted_share']:.1%}",
            f"{e['stall_ms_per_token']:.2f}",
            "-" if e["link_ceiling_tok_per_s"] is None else f"{e['link_ceiling_tok_per_s']:.1f}",
            "-" if e["fraction_of_link_ceiling"] is None else f"{e['fraction_of_link_ceiling']:.0%}",
            peak,
            logits,
            tokens,
        )
    console = Console(width=220)
    console.print(t)
    console.print(f"model: {report['model_reduction']}")
    sm = report.get("summary") or {}
    console.print(
        f"bf16 tokens identical to baseline: {sm.get('bf16_tokens_identical_to_baseline')}; "
        f"bf16 logits bit-equal: {sm.get('bf16_logits_bit_equal_to_baseline')} "
        f"(max |Δ| {sm.get('bf16_max_abs_logit_diff')}); int8 bit-equal to the resident run on its dequantized "
        f"weights: {sm.get('int8_bit_equal_to_dequantized_resident')}; failed: {sm.get('runs_failed')}; "
        f"skipped: {sm.get('runs_skipped')}"
    )


if __name__ == "__main__":
    sys.exit(main())
