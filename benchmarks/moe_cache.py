"""MoE expert streaming on the CPU: hit rate, predictor recall, bytes and wasted bytes per token.

Models:
- the MoEfied SmolLM2 (`torus-sparse moefy`: SmolLM2-135M split into routed experts with a
  router fitted on real activations, so routing is real, not random) — every hit-rate target
  is judged on it;
- random-init configs (`--tiny`, OLMoE- and Mixtral-shaped, scaled down): routing of untrained
  routers is close to uniform, a pessimistic case for caches and predictors.

Workload: a fixed list of varied chat prompts, greedy decoding, `--tokens` new tokens each, batch
1, KV cache, transport "copy" (the CPU twin of the CUDA copy stream: same slot ring and ordering
rules, a worker thread for the memcpy). The expert cache persists across prompts, as in a
server. Counters are reset after each prompt's prefill, so every figure is about decoding:
- hit rate: routed experts already in the cache (or on their way) when their layer started;
- recall: routed experts the predictor had named for that layer;
- bytes/token: expert bytes copied per decoded token (prefetches included);
- wasted: bytes of prefetched experts evicted before any use, as a share of bytes moved;
- tok/s next to the unwrapped model's (eager experts, everything resident) in the same run.
Tokens are compared with the unwrapped model's: they must be identical in every row.

Variants: predictor (none, frequency, speculative, learned when a predictor file exists) ×
cache size (a quarter, half, three quarters of all experts; shared, LRU, prefetch k = top-k),
then at half the experts: LFU eviction, per-layer caches, and a larger prefetch k.

    python benchmarks/moe_cache.py                       # MoEfied SmolLM2 (built once, cached)
    python benchmarks/moe_cache.py --tiny --tokens 16    # random-init shapes only (quick)

Writes benchmarks/results/scratch/moe_cache.json (with --record the recorded
benchmarks/results/moe_cache.json; --merge adds to the file it writes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import torch

import torus_plugins as tp

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
]


def tiny_models() -> dict[str, Any]:
    """Random-init MoE models shaped like OLMoE-1B-7B and Mixtral, scaled down for a CPU."""
    import transformers as T

    common = dict(vocab_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4)
    return {
        "random-olmoe-64x8": T.OlmoeConfig(
            **common, hidden_size=128, intermediate_size=64, num_experts=64, num_experts_per_tok=8
        ),
        "random-mixtral-8x2": T.MixtralConfig(
            **common, hidden_size=128, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2
        ),
    }


def load(source: Any) -> tuple[Any, list[torch.Tensor]]:
    """The model (eager experts) and the prompts' ids: chat turns for a checkpoint, random ids for a config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if isinstance(source, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(source, experts_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(source)
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
            for p in PROMPTS
        ]
        prompts = [p["input_ids"] if not isinstance(p, torch.Tensor) else p for p in prompts]
    else:
        model = AutoModelForCausalLM.from_config(source, experts_implementation="eager").eval()
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, source.vocab_size, (1, 24), generator=g) for _ in PROMPTS]
    return model, prompts


@torch.no_grad()
def decode(model: Any, prompts: list[torch.Tensor], tokens: int, engine: tp.Engine | None) -> dict[str, Any]:
    """Greedy decode of every prompt; counters summed over the decode phases only."""
    sums: dict[str, float] = {}
    outs, seconds = [], 0.0
    for ids in prompts:
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if engine is not None:
            engine.reset_stats()
        gen = [nxt]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            gen.append(nxt)
        seconds += time.perf_counter() - t0
        outs.append(torch.cat(gen, dim=1))
        if engine is not None:
            st = engine.stats().experts
            for layer in st.layers:
                for key in ("routed", "hits", "misses", "loads", "bytes_moved", "wasted_bytes", "stall_s"):
                    sums[key] = sums.get(key, 0) + getattr(layer, key)
                sums["predicted_routed"] = sums.get("predicted_routed", 0) + layer.predicted_routed
                sums["predicted_correct"] = sums.get("predicted_correct", 0) + layer.predicted_correct
    steps = len(prompts) * (tokens - 1)
    row: dict[str, Any] = {"tok_s": steps / seconds, "tokens": outs}
    if engine is not None:
        moved = sums["bytes_moved"]
        row.update(
            hit_rate=sums["hits"] / sums["routed"],
            recall=sums["predicted_correct"] / sums["predicted_routed"] if sums["predicted_routed"] else None,
            bytes_per_token=moved / steps,
            experts_loaded_per_token=sums["loads"] / steps,
            misses_per_token=sums["misses"] / steps,
            wasted_share=sums["wasted_bytes"] / moved if moved else 0.0,
            wasted_bytes_per_token=sums["wasted_bytes"] / steps,
            stall_ms_per_token=1000 * sums["stall_s"] / steps,
        )
    return row


def variants(total: int, top_k: int, predictor_path: str | None) -> list[dict[str, Any]]:
    preds = ["none", "frequency", "speculative"] + (["learned"] if predictor_path else [])
    out = []
    for frac in (0.25, 0.5, 0.75):
        for p in preds:
            out.append(
                dict(
                    moe_predictor=p,
                    moe_cache_experts=max(top_k, int(total * frac)),
                    cache_share=frac,
                    moe_eviction="lru",
                )
            )
    half = max(top_k, total // 2)
    for p in [x for x in preds if x != "none"]:
        out.append(dict(moe_predictor=p, moe_cache_experts=half, cache_share=0.5, moe_eviction="lfu"))
        out.append(dict(moe_predictor=p, moe_cache_experts=half, cache_share=0.5, moe_eviction="next-use"))
        out.append(
            dict(
                moe_predictor=p,
                moe_cache_experts=half,
                cache_share=0.5,
                moe_cache_scope="per-layer",
                moe_eviction="lru",
            )
        )
        out.append(
            dict(
                moe_predictor=p,
                moe_cache_experts=half,
                cache_share=0.5,
                moe_expert_prefetch_k=2 * top_k,
                moe_eviction="lru",
            )
        )
    for v in out:
        if v["moe_predictor"] == "learned":
            v["moe_predictor_path"] = predictor_path
    return out


def bench_model(name: str, source: Any, tokens: int, predictor_path: str | None, lookahead: int) -> dict[str, Any]:
    from torus_adapters.transformers_adapter.moe_architectures import moe_info

    model, prompts = load(source)
    info = moe_info(model)
    total = info["moe_layers"] * info["experts"]
    base = decode(model, prompts, tokens, None)
    rows = []
    for v in variants(total, info["top_k"], predictor_path):
        share = v.pop("cache_share")
        cfg = tp.TorusConfig(transport="copy", lookahead=lookahead, **v)
        engine = tp.attach(model, cfg)
        try:
            r = decode(model, prompts, tokens, engine)
        finally:
            tp.detach(model)
        same = all(torch.equal(a, b) for a, b in zip(r.pop("tokens"), base["tokens"]))
        row = {
            "predictor": cfg.moe_predictor,
            "cache_experts": cfg.moe_cache_experts,
            "cache_share": share,
            "eviction": cfg.moe_eviction,
            "scope": cfg.moe_cache_scope,
            "prefetch_k": cfg.moe_expert_prefetch_k or info["top_k"],
            **r,
            "tok_s_vs_unwrapped": r["tok_s"] / base["tok_s"],
            "tokens_equal": same,
        }
        rows.append(row)
        print_row(name, row)
    return {"model": name, **info, "total_experts": total, "unwrapped_tok_s": base["tok_s"], "rows": rows}


def print_row(name: str, r: dict[str, Any]) -> None:
    recall = "-" if r["recall"] is None else f"{r['recall']:.1%}"
    print(
        f"{name:22} {r['predictor']:11} cache={r['cache_experts']:4} ({r['cache_share']:.0%}) {r['eviction']} "
        f"{r['scope']:9} k={r['prefetch_k']:2}  hit {r['hit_rate']:6.1%}  recall {recall:>6}  "
        f"{r['bytes_per_token'] / 2**20:7.2f} MiB/tok  wasted {r['wasted_share']:5.1%}  "
        f"{r['tok_s']:6.1f} tok/s ({r['tok_s_vs_unwrapped']:.2f}x)  same={r['tokens_equal']}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an MoE model directory (default: the MoEfied SmolLM2 variants, built once)")
    ap.add_argument(
        "--moefy",
        nargs="+",
        default=["32,14,0.3334", "32,8,0.5"],
        help="MoEfied SmolLM2 variants as experts,top_k,shared_fraction (default: the default build, 32,14,0.3334, "
        "and a sparser one, 32,8,0.5)",
    )
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts used (default {len(PROMPTS)})")
    ap.add_argument("--predictor", help="learned predictor file (default: <model>/predictor.safetensors if present)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    ap.add_argument("--lookahead", type=int, default=1, help="MoE layers predicted ahead (default 1)")
    ap.add_argument("--tiny", action="store_true", help="random-init shapes only")
    ap.add_argument("--no-tiny", action="store_true", help="skip the random-init shapes")
    ap.add_argument(
        "--merge", action="store_true", help="add to the output file's models instead of replacing the file"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the copy worker gets a core)")
    harness.add_output_args(ap, "moe_cache.json")
    return ap.parse_args(argv)


def checkpoints(args: argparse.Namespace) -> list[tuple[Path, str | None]]:
    """(model directory, learned predictor file or None) for every checkpoint measured."""
    if args.tiny:
        return []
    if args.model:
        paths = [Path(args.model)]
    else:
        from torus_adapters.tools.moefy import moefied_model_path

        paths = [moefied_model_path(int(e), int(k), float(f)) for e, k, f in (x.split(",") for x in args.moefy)]
    out = []
    for path in paths:
        pred = args.predictor if args.model else None
        if pred is None and (path / "predictor.safetensors").is_file():
            pred = str(path / "predictor.safetensors")
        out.append((path, pred))
    return out


def bench_checkpoint(path: Path, pred: str | None, args: argparse.Namespace) -> dict[str, Any]:
    entry = bench_model(path.name, path, args.tokens, pred, args.lookahead)
    report = path / "moefy_report.json"
    if report.is_file():
        entry["moefy_report"] = json.loads(report.read_text())
    return entry


SETTINGS = ("tokens_per_prompt", "prompts", "lookahead", "threads")


def merge_earlier(out: Path, results: dict[str, Any]) -> bool:
    """Keep the models an earlier run of `out` (same settings) measured that this run did not redo."""
    earlier = json.loads(out.read_text())
    same = {k: earlier.get(k) == results[k] for k in SETTINGS}
    if not all(same.values()):
        print(f"--merge: settings differ from {out} ({same}); not merging", file=sys.stderr)
        return False
    done = {m["model"] for m in results["models"]}
    results["models"] = [m for m in earlier["models"] if m["model"] not in done] + results["models"]
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, "moe_cache.json", threads=args.threads)
    del PROMPTS[args.prompts :]
    results: dict[str, Any] = {
        "method": __doc__,
        "tokens_per_prompt": args.tokens,
        "prompts": list(PROMPTS),
        "lookahead": args.lookahead,
        "threads": args.threads,
        "models": [bench_checkpoint(path, pred, args) for path, pred in checkpoints(args)],
    }
    if not args.no_tiny:
        results["models"] += [
            bench_model(n, cfg, args.tokens, None, args.lookahead) for n, cfg in tiny_models().items()
        ]
    if args.merge and run.out.is_file() and not merge_earlier(run.out, results):
        return 2
    run.save({"benchmark": "moe_cache", **harness.environment(), **results})
    print(f"wrote {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
