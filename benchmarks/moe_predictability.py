"""How predictable is the MoEfied SmolLM2's routing? Upper bounds for the expert cache's hit rate.

Question (from the MoE issue's target: >= 97% hits with <= 10% wasted bytes at a cache holding half
the experts): is the shortfall in `moe_cache.json` the engine's, or the model's? This script
answers from routing traces alone, with no cache and no engine timing in the way.

Traces: greedy decoding (batch 1, KV cache, eager experts) of `moe_cache.py`'s prompts (the
test set: the same greedy continuations the engine benchmark decodes; 32 tokens each, of which the
recorded moe_cache.json run decoded the first 24) and of a disjoint list of training
prompts; forward hooks on each MoE layer's router (found through the registered MoE
architecture's `expert_sites`, as the engine does) record its input and routed experts per
decoded token.

Measured on the test traces, over every decoded token and MoE layer j >= 1:
- exact: layer j's own router on its own recorded input (sanity: ~1.0; exact ties aside);
- speculative recall@k: the engine's speculative predictor (layer j's router on layer j-1's
  input, re-weighted by the two layers' norm scales; the function the engine itself uses) names
  its k best experts; recall = routed experts named / routed experts. k from top-k up;
- lookahead 2: the same from layer j-2's input;
- previous token: routed experts that the same layer also routed for the previous token
  (what any recency cache can at best reuse);
- union: routed experts that were predicted (speculative, k = top-k) OR routed for the previous
  token (or the two previous tokens), with the average size of that set per layer. A cache that
  keeps the previous token's experts and prefetches the prediction can hit at most this share,
  and it needs that many slots per layer;
- trained probes (fitted on the training traces, scored on the test traces): per layer, a
  logistic regression from layer j-1's rescaled input to layer j's routed set, initialised at
  the router ("linear"); and one that also sees layer j-1's routed set and the previous token's
  routed set at layer j ("linear+routing").

Run:  python benchmarks/moe_predictability.py [--model DIR] [--tokens 32] [--train-tokens 40] [--record | --out PATH]
Writes benchmarks/results/scratch/moe_predictability.json (with --record the recorded
benchmarks/results/moe_predictability.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import torch
from moe_cache import PROMPTS  # the engine benchmark's prompts: the test set (a sibling script)

TRAIN_PROMPTS = [
    "Describe the water cycle.",
    "What are the benefits of exercise?",
    "Tell me a story about a dragon.",
    "How do computers store data?",
    "Summarize the plot of Romeo and Juliet.",
    "What is photosynthesis?",
    "Give tips for learning a new language.",
    "Explain gravity to a child.",
    "Write an email asking for a day off.",
    "What causes earthquakes?",
    "How do I bake bread?",
    "Name five famous painters and their works.",
    "What is the difference between weather and climate?",
    "Explain how vaccines work.",
    "Write a haiku about autumn.",
    "How does the internet work?",
    "What should I pack for a camping trip?",
    "Explain the rules of chess briefly.",
    "Why do cats purr?",
    "What is machine learning?",
    "Describe a day in ancient Rome.",
    "How do airplanes fly?",
    "Give me three ideas for a birthday party.",
    "What is inflation in economics?",
]


@torch.no_grad()
def decode_traces(
    model: Any, tok: Any, sites: list, prompts: list[str], tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, L, H] router inputs and [T, L, k] routed experts, one row per decoded token."""
    rows_h: list[list[torch.Tensor]] = [[] for _ in sites]
    rows_e: list[list[torch.Tensor]] = [[] for _ in sites]
    recording = [False]

    def hook(j: int):
        def f(module, args, kwargs, out):
            if recording[0]:
                h = args[0] if args else kwargs["hidden_states"]
                rows_h[j].append(h.detach().reshape(-1, h.shape[-1])[-1].float())
                rows_e[j].append(out[2].detach().reshape(-1, out[2].shape[-1])[-1].long())

        return f

    handles = [s.router.register_forward_hook(hook(j), with_kwargs=True) for j, s in enumerate(sites)]
    try:
        for p in prompts:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt"
            )
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            recording[0] = False
            out = model(input_ids=ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            recording[0] = True
            for _ in range(tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    finally:
        for h in handles:
            h.remove()
    return (
        torch.stack([torch.stack(r) for r in rows_h], dim=1),
        torch.stack([torch.stack(r) for r in rows_e], dim=1),
    )


def multihot(routed: torch.Tensor, experts: int) -> torch.Tensor:
    m = torch.zeros(*routed.shape[:2], experts)
    return m.scatter_(2, routed, 1.0)


def recall(scores: torch.Tensor, routed: torch.Tensor, k: int) -> float:
    """Share of routed experts (multi-hot `routed`) among the k best `scores`."""
    named = scores.topk(k, dim=-1).indices
    return float(torch.gather(routed, -1, named).sum() / routed.sum())


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, epochs: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression x -> multi-hot y, started at `init` (so it begins as the router)."""
    torch.manual_seed(0)
    w = init.clone().requires_grad_(True)
    b = torch.zeros(y.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y) + 1e-4 * ((w - init) ** 2).sum()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", type=Path, help="an MoE model directory (default: the MoEfied SmolLM2, 32 experts, top-14)"
    )
    ap.add_argument(
        "--tokens", type=int, default=32, help="decoded tokens per test prompt (moe_cache.py's default: 32)"
    )
    ap.add_argument("--train-tokens", type=int, default=40, help="decoded tokens per training prompt")
    ap.add_argument("--threads", type=int, default=2)
    harness.add_output_args(ap, "moe_predictability.json")
    return ap.parse_args(argv)


@dataclass
class Traces:
    """Decode traces of the test and training prompts, and the MoE sites that made them."""

    sites: list
    spec: Any  # the engine's speculative scorer over these sites
    h_te: torch.Tensor  # [T, L, H] router inputs
    r_te: torch.Tensor  # [T, L, k] routed experts
    h_tr: torch.Tensor
    r_tr: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """(MoE layers, experts, top-k)."""
        return len(self.sites), self.sites[0].num_experts, self.sites[0].top_k


def record_traces(path: Path, args: argparse.Namespace) -> Traces:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torus_plugins.moe.streamer import _speculative_scores
    from torus_plugins.plugins import resolve

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    arch = next(a for a in resolve().architectures if hasattr(a, "expert_sites") and a.matches(model))
    sites = arch.expert_sites(model)
    print(
        f"recording decode traces: {len(PROMPTS)} test prompts x {args.tokens}, "
        f"{len(TRAIN_PROMPTS)} training prompts x {args.train_tokens} ...",
        flush=True,
    )
    h_te, r_te = decode_traces(model, tok, sites, PROMPTS, args.tokens)
    h_tr, r_tr = decode_traces(model, tok, sites, TRAIN_PROMPTS, args.train_tokens)
    return Traces(sites, _speculative_scores(arch, sites), h_te, r_te, h_tr, r_tr)


def predictability(tr: Traces, tokens: int) -> dict[str, Any]:
    """Every measure of the module docstring on the test traces (probes fitted on the training ones)."""
    n_layers, n_exp, k = tr.shape
    spec, h_te = tr.spec, tr.h_te
    y_te, y_tr = multihot(tr.r_te, n_exp), multihot(tr.r_tr, n_exp)
    target = y_te[:, 1:]
    with torch.no_grad():
        exact = torch.stack([spec(j, h_te[:, j]) for j in range(n_layers)], 1)
        s1_te = torch.stack([spec(j, h_te[:, j - 1], j - 1) for j in range(1, n_layers)], 1)
        s1_tr = torch.stack([spec(j, tr.h_tr[:, j - 1], j - 1) for j in range(1, n_layers)], 1)
        s2 = torch.stack([spec(j, h_te[:, j - 2], j - 2) for j in range(2, n_layers)], 1)
    ks = sorted({x for x in (k, k + 2, k + 4, k + 6, k + 10, 2 * k) if x <= n_exp})
    res: dict[str, Any] = {
        "exact_router_recall": recall(exact, y_te, k),
        "speculative_recall_at_k": {str(x): recall(s1_te, target, x) for x in ks},
        "speculative_lookahead2_recall_at_topk": recall(s2, y_te[:, 2:], k),
        "speculative_recall_per_layer": [
            round(recall(s1_te[:, i : i + 1], target[:, i : i + 1], k), 4) for i in range(n_layers - 1)
        ],
    }
    res.update(recency(y_te, s1_te, k, tokens))
    print("training probes ...", flush=True)
    res.update(probes(tr, y_te, y_tr, s1_te, s1_tr))
    return res


def recency(y_te: torch.Tensor, s1_te: torch.Tensor, k: int, tokens: int) -> dict[str, Any]:
    """Reuse from the previous token(s), alone and together with the speculative prediction."""
    n_layers, n_exp = y_te.shape[1], y_te.shape[2]
    target = y_te[:, 1:]
    prev1 = torch.cat([torch.zeros(1, n_layers, n_exp), y_te[:-1]], 0)[:, 1:]
    prev2 = torch.cat([torch.zeros(2, n_layers, n_exp), y_te[:-2]], 0)[:, 1:]
    # Token 0 of each prompt has no previous token in its own prompt: score tokens 1.. of each.
    first = torch.zeros(len(target), dtype=torch.bool)
    first[:: tokens - 1] = True
    keep = ~first
    keep2 = keep.clone()
    keep2[1 :: tokens - 1] = False
    named = torch.zeros_like(target).scatter_(-1, s1_te.topk(k, -1).indices, 1.0)

    def share(mask: torch.Tensor, rows: torch.Tensor) -> float:
        return float((mask[rows] * target[rows]).sum() / target[rows].sum())

    union1 = ((named + prev1) > 0).float()
    union2 = ((named + prev1 + prev2) > 0).float()
    return {
        "previous_token_reuse": share(prev1, keep),
        "union_predicted_or_previous_token": {
            "covered": share(union1, keep),
            "experts_per_layer": float(union1[keep].sum(-1).mean()),
        },
        "union_predicted_or_two_previous_tokens": {
            "covered": share(union2, keep2),
            "experts_per_layer": float(union2[keep2].sum(-1).mean()),
        },
        "half_cache_experts_per_layer": n_exp / 2,
    }


def probes(tr: Traces, y_te: torch.Tensor, y_tr: torch.Tensor, s1_te: torch.Tensor, s1_tr: torch.Tensor) -> dict:
    """Per layer: a logistic probe from the previous layer's rescaled input ("linear"), and one that
    also sees the routed sets ("linear+routing"); recall@top-k on the test traces."""
    n_layers, n_exp, k = tr.shape
    sites = tr.sites
    lin, rich = [], []
    prev_tr = torch.cat([torch.zeros(1, n_layers, n_exp), y_tr[:-1]], 0)
    prev_te = torch.cat([torch.zeros(1, n_layers, n_exp), y_te[:-1]], 0)
    norm = float(s1_tr.std())
    for i in range(n_layers - 1):
        j = i + 1
        router_w = sites[j].router.weight.detach().float()
        x_tr = _rescaled(sites, tr.h_tr[:, i], i, j)
        x_te = _rescaled(sites, tr.h_te[:, i], i, j)
        w, b = fit_probe(x_tr, y_tr[:, j], router_w)
        lin.append(x_te @ w.T + b)
        f_tr = torch.cat([s1_tr[:, i] / norm, y_tr[:, i], prev_tr[:, j]], -1)
        f_te = torch.cat([s1_te[:, i] / norm, y_te[:, i], prev_te[:, j]], -1)
        init = torch.zeros(n_exp, 3 * n_exp)
        init[:, :n_exp] = torch.eye(n_exp)
        w, b = fit_probe(f_tr, y_tr[:, j], init, epochs=400)
        rich.append(f_te @ w.T + b)
    target = y_te[:, 1:]
    return {
        "probe_linear_recall_at_topk": recall(torch.stack(lin, 1), target, k),
        "probe_linear_routing_recall_at_topk": recall(torch.stack(rich, 1), target, k),
    }


ENGINE_KEYS = ("predictor", "eviction", "scope", "cache_share", "prefetch_k", "hit_rate", "recall", "wasted_share")


def engine_rows(model_name: str) -> list[dict[str, Any]] | None:
    """The recorded moe_cache.json's half-cache speculative rows for this model, beside the bounds."""
    moe_cache = harness.RESULTS / "moe_cache.json"
    if not moe_cache.is_file():
        return None
    engine = None
    for m in json.loads(moe_cache.read_text()).get("models", []):
        if m.get("model") == model_name:
            engine = [
                {key: r.get(key) for key in ENGINE_KEYS}
                for r in m.get("rows", [])
                if r.get("cache_share") == 0.5 and r.get("predictor") == "speculative"
            ]
    return engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, "moe_predictability.json", threads=args.threads)
    path = args.model
    if path is None:
        from torus_adapters.tools.moefy import moefied_model_path

        path = moefied_model_path(32, 14, 0.3334)
    tr = record_traces(path, args)
    res = predictability(tr, args.tokens)
    n_layers, n_exp, k = tr.shape
    out = {
        "benchmark": "moe_predictability",
        **harness.environment(),
        "method": __doc__,
        "model": {"path": str(path), "name": Path(path).name, "moe_layers": n_layers, "experts": n_exp, "top_k": k},
        "test": {"prompts": PROMPTS, "tokens_per_prompt": args.tokens, "decoded_tokens": int(tr.h_te.shape[0])},
        "train": {
            "prompts": TRAIN_PROMPTS,
            "tokens_per_prompt": args.train_tokens,
            "decoded_tokens": int(tr.h_tr.shape[0]),
        },
        "results": res,
        "engine_half_cache_speculative_rows_from_moe_cache_json": engine_rows(Path(path).name),
    }
    run.save(out, indent=1)
    _table(res, k)
    print(f"wrote {run.out}")
    return 0


def _rescaled(sites: list, hidden: torch.Tensor, source: int, j: int) -> torch.Tensor:
    """Layer `source`'s router input as layer j's router would see it (norm scales re-weighted),
    the same re-weighting the speculative predictor applies."""
    a, b = sites[source].input_scale, sites[j].input_scale
    if a is None or b is None:
        return hidden
    a, b = a.detach().float(), b.detach().float()
    return hidden * torch.where(a != 0, b / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))


def _table(res: dict[str, Any], k: int) -> None:
    t = harness.table(
        "MoE routing predictability (decode traces; recall = routed experts named / routed)", ("measure", "value")
    )
    t.add_row("exact router on its own input (sanity)", f"{res['exact_router_recall']:.4f}")
    for x, v in res["speculative_recall_at_k"].items():
        t.add_row(f"speculative recall@{x} (next layer)", f"{v:.3f}")
    t.add_row(f"speculative recall@{k}, two layers ahead", f"{res['speculative_lookahead2_recall_at_topk']:.3f}")
    t.add_row(f"trained linear probe recall@{k}", f"{res['probe_linear_recall_at_topk']:.3f}")
    t.add_row(f"trained probe + routed sets recall@{k}", f"{res['probe_linear_routing_recall_at_topk']:.3f}")
    t.add_row("routed by the same layer for the previous token", f"{res['previous_token_reuse']:.3f}")
    u1, u2 = res["union_predicted_or_previous_token"], res["union_predicted_or_two_previous_tokens"]
    t.add_row(f"predicted or previous token ({u1['experts_per_layer']:.1f} experts/layer)", f"{u1['covered']:.3f}")
    t.add_row(f"predicted or two previous tokens ({u2['experts_per_layer']:.1f} experts/layer)", f"{u2['covered']:.3f}")
    t.add_row("half cache: experts per layer", f"{res['half_cache_experts_per_layer']:.0f}")
    harness.show(t, width=None)


if __name__ == "__main__":
    sys.exit(main())
