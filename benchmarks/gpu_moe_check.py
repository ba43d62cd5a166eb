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
parameter made directly in bf16 (`normal_(0, 0.02)` drawn on the GPU from a generator seeded with
--seed, copied to the host matrix by matrix; ones for the norms), with
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

Output: a table, and JSON at --out, else benchmarks/results/gpu_moe_check.json with --record, else
$OUT/gpu_moe_check.json when OUT is set, else benchmarks/results/scratch/gpu_moe_check.json (`_tiny`
with --tiny), rewritten after every phase. Every
variant is guarded: a failure is recorded in the JSON and the rest still run; a variant whose
predicted duration (the last run's, scaled for int8, plus the host probe, repacking and `verify`
for a host variant) would end the script after --max-seconds is skipped, saying so. SIGTERM marks
the variant it cut as interrupted, writes the summary and the table, and exits 143. Each variant
also times one expert's host store buffer to the device (`store_buffer_link`). Exit status 0
whether or not the checks pass; non-zero only if the script itself fails (143 after SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import torch
from harness import fmt_bytes, free_device_memory, log, peak_allocated, sync
from torch import nn

# `past_key_values=` is deprecated in newer transformers (5.24) but is what the device's (5.17) knows
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

MiB = 2**20
OLMOE_LAYERS = 16  # OLMoE-1B-7B's decoder layers


def olmoe_dims(hidden: int, intermediate: int, experts: int, top_k: int, heads: int, vocab: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_experts=experts,
        num_experts_per_tok=top_k,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # MHA
        vocab_size=vocab,
    )


FULL = olmoe_dims(2048, 1024, 64, 8, 16, 50304)  # OLMoE-1B-7B's per-layer shape
TINY = olmoe_dims(64, 32, 8, 2, 4, 512)


# --------------------------------------------------------------------------- model
def build_model(dims: dict[str, int], layers: int, seed: int, device: torch.device | None = None) -> nn.Module:
    """An OlmoeForCausalLM with deterministic random bf16 weights on the host (drawn on `device`
    from a seeded generator: `harness.random_bf16`), eager experts, no float32 pass."""
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
    model = harness.random_bf16(lambda: OlmoeForCausalLM(cfg), seed, device=device)
    if getattr(model.config, "_experts_implementation", None) != "eager":
        model.set_experts_implementation("eager")
    return model


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.model.layers for p in layer.mlp.experts.parameters(recurse=False)]


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


# --------------------------------------------------------------------------- the check's state
@dataclass(kw_only=True)
class Check(harness.DeviceCheck):
    """What every phase reads: the model's shape, the one host model, the link, prompts and baseline."""

    dims: dict[str, int]
    layers: int
    reduction: str
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    link_Bps: float = 0.0
    ids: Any = None
    warm: Any = None
    base: dict[str, Any] = field(default_factory=dict)
    originals: list = field(default_factory=list)  # (expert parameter, its built tensor)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (hidden 64, 8 experts, top-2, 2 layers); CPU ok")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 of OLMoE's 16; tiny 2)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy decode steps timed (default 32)")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="decode steps of the untimed warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--lookahead", type=int, default=1, help="MoE layers predicted ahead (default 1)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 run")
    ap.add_argument("--no-host", action="store_true", help='skip the host-placement runs (host_compute="auto")')
    ap.add_argument("--max-seconds", type=float, default=150.0, help="skip variants that would end after this (150)")
    ap.add_argument("--seed", type=int, default=0)
    harness.add_output_args(ap, "gpu_moe_check.json (gpu_moe_check_tiny.json with --tiny)", device_out=True)
    return ap.parse_args(argv)


def start(args: argparse.Namespace) -> Check | None:
    picked = harness.pick_device(args.tiny, "gpu_moe_check")
    if picked is None:
        return None
    device, transport = picked
    layers = args.layers or (2 if args.tiny else 4)
    reduction = (
        "tiny config (not OLMoE-shaped): smoke test of the logic; speed numbers mean nothing"
        if args.tiny
        else f"OLMoE-1B-7B per-layer shapes, {layers} of its {OLMOE_LAYERS} decoder layers: per-token expert "
        f"bytes, stall and tok/s cover {layers} MoE layers (the full model moves ~{OLMOE_LAYERS / layers:g}x the "
        f"expert bytes per token); random init, so routing is near-uniform (a pessimistic case for caches "
        f"and predictors)"
    )
    name = "gpu_moe_check_tiny.json" if args.tiny else "gpu_moe_check.json"
    dims = TINY if args.tiny else FULL
    run = harness.begin(args, name, device_out=True)
    c = Check(args=args, device=device, transport=transport, run=run, dims=dims, layers=layers, reduction=reduction)
    c.report = {
        "benchmark": "gpu_moe_check" + ("_tiny" if args.tiny else ""),
        **harness.environment(),
        **harness.device_record(device),
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
    v = c.report["versions"]
    log(f"device {c.report['device']}; torch {v['torch']}, transformers {v['transformers']}")
    log(f"model: {reduction}")
    return c


# --------------------------------------------------------------------------- phases
def build_and_link(c: Check) -> None:
    """1. The host model and its sizes; the pinned link (256 MiB and one expert); the prompts."""
    from torus_adapters.transformers_adapter.moe_architectures import moe_info

    t0 = time.perf_counter()
    c.model = model = build_model(c.dims, c.layers, c.args.seed, c.device)
    c.info = info = moe_info(model)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_total = sum(p.numel() * p.element_size() for p in expert_params(model))
    c.report["model"] = {
        "class": type(model).__name__,
        "parameters": n_params,
        "bytes": model_bytes,
        "expert_bytes_total": expert_total,
        "non_expert_bytes": model_bytes - expert_total,
        **info,
        "total_experts": info["moe_layers"] * info["experts"],
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "build_s": time.perf_counter() - t0,
    }
    log(
        f"built {n_params / 1e6:.1f} M params ({fmt_bytes(model_bytes)}) in {c.report['model']['build_s']:.1f} s: "
        f"{info['moe_layers']} MoE layers x {info['experts']} experts (top-{info['top_k']}), "
        f"{fmt_bytes(info['expert_bytes'])} per expert, experts {fmt_bytes(expert_total)}"
    )
    c.save()
    bw = harness.link_bandwidth(c.device, {"256MiB": 256 * MiB, "expert": info["expert_bytes"]})
    c.report["bandwidth"] = bw
    c.link_Bps = bw["256MiB"]["GBps"] * 1e9
    log(f"link: {bw['method']}: 256 MiB {c.link_Bps / 1e9:.2f} GB/s, one expert {bw['expert']['GBps']:.2f} GB/s")
    free_device_memory(c.device)
    g = torch.Generator().manual_seed(c.args.seed + 1)
    vocab, n = c.dims["vocab_size"], c.args.prompt_tokens
    c.ids = torch.randint(3, vocab, (1, n), generator=g).to(c.device)
    c.warm = torch.randint(3, vocab, (1, n), generator=g).to(c.device)
    c.save()


def baseline(c: Check) -> None:
    """2. Everything resident, eager experts: the reference run."""
    c.base = base = resident_run(c.model, c.args, c.ids, c.warm, c.device)
    c.report["phases"]["baseline"] = {"kind": "resident", **public(base)}
    c.report["model"]["baseline_logits_finite"] = bool(torch.isfinite(base["_prompt_logits"].float()).all())
    log(
        f"baseline: {base['tok_per_s']:.2f} tok/s ({base['ms_per_token']:.2f} ms/token), "
        f"peak {fmt_bytes(base['peak_allocated'])}"
    )
    c.save()


def variants(c: Check) -> list[tuple[str, int, int, str, str | None]]:
    """(name, cache experts, cache share %, predictor, weight quant): quarter and half x none and
    speculative, then int8 at half with speculative."""
    total, top_k = c.report["model"]["total_experts"], c.info["top_k"]
    quarter, half = max(top_k, total // 4), max(top_k, total // 2)
    out = [
        (f"cache{share}_{pred}", n, share, pred, None)
        for share, n in ((25, quarter), (50, half))
        for pred in ("none", "speculative")
    ]
    if not c.args.no_int8:
        out.append(("cache50_speculative_int8", half, 50, "speculative", "int8"))
    if not c.args.no_host:
        # the host placement: experts missing from the cache are computed on the host, not copied
        out += [
            (f"cache{share}_speculative_host", n, share, "speculative", None)
            for share, n in ((25, quarter), (50, half))
        ]
    return out


def streamed_run(c: Check, name: str, entry: dict[str, Any], n_cache: int, pred: str, quant: str | None) -> None:
    """attach, the run, its counters against the baseline, detach (and the int8 run's own reference)."""
    import torus_plugins as tp

    free_device_memory(c.device)
    cfg = tp.TorusConfig(
        transport=c.transport,
        device=str(c.device),
        lookahead=c.args.lookahead,
        moe_cache_experts=n_cache,
        moe_predictor=pred,
        moe_eviction="lru",
        moe_cache_scope="shared",
        weight_quant=quant,
        host_compute="auto" if name.endswith("_host") else "off",
    )
    t0 = time.perf_counter()
    eng = tp.attach(c.model, cfg)
    if eng.host_plan is not None:
        entry["host_plan"] = eng.host_plan.as_dict()
    sync(c.device)
    entry["attach_s"] = time.perf_counter() - t0
    if eng.experts is not None and eng.experts.store.buffers:  # one expert as the store page-locked it
        try:
            entry["store_buffer_link"] = harness.buffer_link(eng.device, eng.experts.store.buffers[0])
        except Exception as exc:  # noqa: BLE001 - informational only
            entry["store_buffer_link"] = {"error": f"{type(exc).__name__}: {exc}"}
    res = greedy_run(c.model, c.ids, c.warm, c.args.tokens, c.args.warmup_tokens, c.device, eng)
    entry.update(public(res))
    entry["vs_baseline"] = compare(c.base, res)
    entry.update(expert_figures(eng.stats(), res, c.base, c.link_Bps, c.args.tokens))
    entry["host_computed"] = eng.stats().experts.totals()["host_computed"]
    cmp = entry["vs_baseline"]
    recall = "-" if entry["recall"] is None else f"{entry['recall']:.1%}"
    log(
        f"{name}: {res['tok_per_s']:.2f} tok/s ({entry['tok_per_s_vs_baseline']:.2f}x base), "
        f"hit {entry['hit_rate']:.1%}, recall {recall}, "
        f"{fmt_bytes(entry['bytes_per_token'])}/token, wasted {entry['wasted_share']:.1%}, "
        f"stall {entry['stall_ms_per_token']:.2f} ms/token, "
        f"tokens equal {cmp['tokens_equal']}, logits max|diff| {cmp['logits_max_abs_diff']:.3g}"
    )
    t0 = time.perf_counter()
    tp.detach(c.model)
    del eng
    entry["detach_s"] = time.perf_counter() - t0
    if quant is None:
        p0, d0 = c.originals[0]
        entry["detach_restored_weights"] = bool(torch.equal(p0.data, d0))
        return
    # detach() left the dequantized experts: the resident run on them is the exact reference
    ref = resident_run(c.model, c.args, c.ids, c.warm, c.device)
    entry["dequantized_resident"] = public(ref)
    entry["vs_dequantized_resident"] = cr = compare(ref, res)
    log(
        f"{name} vs the resident run on its dequantized weights: tokens equal {cr['tokens_equal']}, "
        f"logits max|diff| {cr['logits_max_abs_diff']:.3g}"
    )


def expert_figures(st: Any, res: dict[str, Any], base: dict[str, Any], link_Bps: float, tokens: int) -> dict:
    """Hit rate, recall, bytes and wasted bytes per token, stall, link ceiling, memory."""
    ex = st.experts
    passes = ex.forward_passes or tokens
    tot = ex.totals()
    bpt = ex.bytes_moved / passes
    ceiling = link_Bps / bpt if bpt else None
    return dict(
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


#: the host placement's set-up (the host probe; repacking every expert for the host kernels and
#: `verify`), in seconds per GB of experts and once: allowances on top of a streamed run's time
HOST_SETUP_S_PER_GB = 3.0
HOST_PROBE_S = 15.0


def predict_s(c: Check, last_s: float | None, name: str, quant: str | None) -> float:
    """A variant's expected seconds, all of it: attach (quantizing; the host placement's probe,
    repacking and `verify`), warm-up, prefill, decode, detach (dequantizing) and, for int8, the
    resident rerun on its dequantized weights: the last streamed run's time scaled, plus the
    host allowances for a host variant."""
    s = (last_s or 20.0) * (2.5 if quant else 1.0)
    if name.endswith("_host"):
        s += HOST_PROBE_S + HOST_SETUP_S_PER_GB * c.report["model"]["expert_bytes_total"] / 1e9
    return s


def streamed(c: Check) -> None:
    """3. Every variant, guarded: a failure is recorded and the model made usable again; each run
    starts from the built expert weights."""
    import torus_plugins as tp

    c.originals = [(p, p.data) for p in expert_params(c.model)]
    guard = harness.TimeGuard(c.args.max_seconds, start=c.run.t0)
    last_s: float | None = None
    for name, n_cache, share, pred, quant in variants(c):
        entry: dict[str, Any] = {
            "kind": "streamed",
            "cache_experts": n_cache,
            "cache_share": share / 100,
            "predictor": pred,
            "weight_quant": quant,
            "lookahead": c.args.lookahead,
        }
        c.report["phases"][name] = entry
        skipped = guard.refuse(predict_s(c, last_s, name, quant))
        if skipped:
            entry["skipped"] = skipped
            log(f"{name} skipped: {skipped}")
            c.save()
            continue
        t_run = time.perf_counter()
        try:
            streamed_run(c, name, entry, n_cache, pred, quant)
        except Exception as exc:  # noqa: BLE001 - record, keep the model usable, go on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            c.report["errors"].append({name: traceback.format_exc()})
            log(f"{name} FAILED: {entry['error']}")
            try:
                if tp.is_attached(c.model):
                    tp.detach(c.model)
                c.model.to("cpu")
            except Exception:  # noqa: BLE001
                c.report["errors"].append({f"{name} (cleanup)": traceback.format_exc()})
        for p, d in c.originals:  # every run starts from the built weights (frees detach's copies)
            p.data = d
        free_device_memory(c.device)
        last_s = entry["run_s"] = time.perf_counter() - t_run
        c.save()


def main(argv: list[str] | None = None) -> int:
    c = start(parse_args(argv))
    if c is None:
        return 2
    try:
        with harness.terminable(c, lambda: finish(c)):
            build_and_link(c)
            baseline(c)
    except Exception as exc:  # noqa: BLE001 - nothing to compare against: record, stop
        c.report["fatal"] = f"{type(exc).__name__}: {exc}"
        c.report["errors"].append({"setup": traceback.format_exc()})
        c.save()
        log(f"FAILED before the streamed runs: {c.report['fatal']}")
        traceback.print_exc()
        return 1
    with harness.terminable(c, lambda: finish(c)):  # SIGTERM still writes the summary
        streamed(c)
    finish(c)
    return 0


def finish(c: Check) -> None:
    c.report["summary"] = summarize(c.report)
    c.save()
    print_table(c.report, c.link_Bps)
    log(f"wrote {c.run.out} ({c.report['wall_s']:.0f} s)")


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
    m, s = report["model"], report["settings"]
    title = (
        f"{report['device']}: OLMoE-shaped MoE, {s['layers']} layers x {m['experts']} experts top-{m['top_k']}, "
        f"{fmt_bytes(m['expert_bytes'])}/expert, bf16, {s['decode_steps']} decode steps, lookahead {s['lookahead']}, "
        f"transport {s['transport']}; link {link_Bps / 1e9:.1f} GB/s"
    )
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
    t = harness.table(title, cols)
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
    console = harness.show(t, width=220)
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
