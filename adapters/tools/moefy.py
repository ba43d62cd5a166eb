"""MoEfication: turn the embedded dense SmolLM2-135M-Instruct into a Qwen2-MoE checkpoint with real routing.

The project streams MoE experts from host RAM and needs a test MoE model whose router picks experts
from real hidden states. No small real MoE ships with it, so this module builds one, offline and
deterministically, from the dense model's SwiGLU FFNs (`down(silu(gate(x)) * up(x))`, 1536 neurons
per layer, 30 layers):

1. Statistics: the FFN input x and activations a = silu(gate(x)) * up(x) of every layer on
   real text: this repository's `LICENSE` (AGPL-3.0) tokens 0..stats_tokens (windows of 1024) plus
   the replies SmolLM2 itself writes, greedily, to the short varied `CHAT_PROMPTS` below
   (prompt and reply tokens, 2,620 in all).
2. Shared expert: the neurons with the largest mean output contribution (mean |a_j| times the norm
   of down_proj's column j) go into the always-on shared expert. The count is `shared_fraction`
   of the neurons, rounded so that every routed expert holds a multiple of 8 neurons (transformers'
   CPU `grouped_mm` experts kernel needs 16-byte aligned rows; the report gives the actual share).
3. Routed experts: the remaining neurons are split into `num_experts` equal groups by balanced
   k-means (fixed seed) on their L2-normalised |a| patterns over the statistics tokens, so neurons
   that fire together share an expert.
4. Router: per layer a linear map hidden -> E, fitted by ridge least squares to the per-token
   centred log of each group's activation norm ||a_group||; its top-k are the routed experts.
   "Oracle" routing, the upper bound for any router, takes the k groups with the largest norm.

Exactness: the Qwen2-MoE block computes
`sum_{e in topk} w_e * expert_e(x) + sigmoid(g . x) * shared(x)` with `w = softmax(logits)[topk]`
renormalised over the top-k (`norm_topk_prob=True`). The router weights are scaled so the logits
have a standard deviation of `ROUTER_LOGIT_STD` (1e-4) on the statistics tokens: the order (the
choice of experts) is unchanged, while every w_e is 1/k within about 0.05%; each expert's down_proj
is multiplied by k. The shared expert gate is zero (sigmoid(0) = 0.5) and its down_proj is doubled,
which is exact. So with the right experts chosen the block reproduces the dense FFN restricted to
the chosen neurons, and with top_k == num_experts it reproduces the dense model (logits within
4.2e-3 measured, 2e-2 asserted in tests/test_moefy.py). Attention (no q/k/v biases: `qkv_bias=False`), embeddings
(tied), norms, rope theta 100000 and rms eps are copied unchanged; no sliding window; every layer is
MoE (`decoder_sparse_step=1`, `mlp_only_layers=[]`). `save_pretrained` writes each expert as
separate `experts.{e}.gate_proj/up_proj/down_proj` tensors; loading fuses them into
`experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`.

Measured (fp32, 2-core CPU, defaults for everything else: 2048 LICENSE + 2620 chat statistics
tokens; perplexity on LICENSE tokens 2048..3071, one 1024-token window, dense = 20.25; "active" =
share of the 1536 FFN neurons computed per token, shared expert included; "oracle" = the same
experts routed by the true top-k group norms; agreement = share of the oracle top-k the router
picks, on dense hidden states of the same held-out tokens; about 1 minute per build):

    E   k   shared  per expert  active  ppl MoE  ppl oracle  agreement
    64  24  33.3%   16          58.3%   34.58    28.23       62.3%
    64  28  33.3%   16          62.5%   32.04    26.54       65.6%
    64  32  33.3%   16          66.7%   29.46    25.55       68.8%
    64  36  33.3%   16          70.8%   26.25    23.45       72.2%
    64  48   0%     24          75.0%   26.74    24.75       85.2%
    32   8  50.0%   24          62.5%   31.43    25.97       54.2%
    32  14  33.3%   32          62.5%   30.03    26.27       66.7%   <- default
    32  16  33.3%   32          66.7%   28.47    24.63       69.8%
    32  16  16.7%   40          58.3%   41.33    39.88       72.2%
    16   8  25.0%   72          62.5%   35.83    31.79       72.4%

The default (32 experts, 14 active, a third of the neurons shared) is the sparsest measured
setting within 1.5x of dense (30.03 = 1.48x); 32x16 is the safer margin (1.41x) at 66.7% active.
The router costs 3-6 perplexity points against the oracle; the ridge strength barely matters
(30.0-30.6 for 1e-4..3e-2). SwiGLU activations are not naturally sparse, so a training-free split
needs about 60-65% of the neurons active to stay near dense: say so next to any figure measured on
this model. Without a shared expert (64x48) it takes 75%.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from torus_plugins.cache_paths import cache_root

#: Defaults, chosen from the table in the module docstring.
DEFAULT_NUM_EXPERTS = 32
DEFAULT_TOP_K = 14
DEFAULT_SHARED_FRACTION = 1 / 3
DEFAULT_STATS_TOKENS = 2048
#: Held-out text for perplexity and router agreement: LICENSE tokens [EVAL_START, EVAL_END).
EVAL_START, EVAL_END = 2048, 3072
STATS_WINDOW = 1024
#: Standard deviation of the router logits on the statistics tokens (see the docstring).
ROUTER_LOGIT_STD = 1e-4
#: Ridge strength relative to the mean diagonal of X^T X.
ROUTER_RIDGE = 1e-3
KMEANS_ITERS = 20
#: Neurons per routed expert are a multiple of this (see `_split`).
EXPERT_ALIGN = 8
#: FFN width of the embedded SmolLM2-135M: validates CLI and cache settings before anything loads.
SMOLLM2_FFN_NEURONS = 1536
SEED = 0
CHAT_NEW_TOKENS = 128
#: Short, varied prompts whose greedy replies add chat-style text to the statistics.
CHAT_PROMPTS = (
    "Explain how a bicycle gear works.",
    "Write a short poem about autumn rain.",
    "What is the capital of France, and what is it known for?",
    "Give me three tips for learning a new language.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I make a simple tomato sauce?",
    "What are the main differences between cats and dogs as pets?",
    "Describe the water cycle for a ten-year-old.",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "What is 17 multiplied by 23? Show your steps.",
    "List some good habits for a healthy sleep routine.",
    "Tell me a short story about a robot who learns to paint.",
    "How does a computer store numbers in binary?",
    "What should I pack for a weekend hiking trip?",
)
#: Bump when the construction changes, so stale caches are rebuilt rather than trusted.
_CACHE_VERSION = "1"
#: Dense families with the llama layout (gate/up/down SwiGLU FFN, q/k/v/o attention, two RMSNorms).
_DENSE_TYPES = ("llama",)
_REPO_LICENSE = Path(__file__).resolve().parents[2] / "LICENSE"

Progress = Callable[[str, int, int], None]


class MoefyError(ValueError):
    """Bad settings for a MoEfication (the CLI prints the message and exits with code 2)."""


# ---------------------------------------------------------------------- settings
def _split(n_neurons: int, num_experts: int, top_k: int, shared_fraction: float, stats_tokens: int) -> tuple[int, int]:
    """Validate the settings; return (shared neurons, neurons per expert).

    Each expert holds a multiple of EXPERT_ALIGN neurons: transformers' default experts kernel on
    the CPU (`grouped_mm`) needs 16-byte aligned rows in `down_proj [E, H, I]`, i.e. I % 8 == 0 in
    bf16 (it fails with "strides should be multiple of 16 bytes" otherwise). So the shared count is
    `shared_fraction` of the neurons rounded to the nearest count that leaves such experts."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("stats_tokens", stats_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MoefyError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(shared_fraction, bool)
        or not isinstance(shared_fraction, (int, float))
        or not 0 <= shared_fraction < 1
    ):
        raise MoefyError(f"shared_fraction must be in [0, 1), got {shared_fraction!r}")
    if top_k > num_experts:
        raise MoefyError(f"top_k ({top_k}) cannot exceed the number of experts ({num_experts})")
    if n_neurons % num_experts:
        raise MoefyError(
            f"{num_experts} experts do not divide the {n_neurons} FFN neurons per layer evenly; "
            f"pick a divisor of {n_neurons} (e.g. 8, 16, 32, 64)"
        )
    if n_neurons // num_experts < EXPERT_ALIGN:
        raise MoefyError(
            f"{num_experts} experts leave fewer than {EXPERT_ALIGN} of the {n_neurons} neurons per expert; "
            f"use at most {n_neurons // EXPERT_ALIGN} experts"
        )
    if stats_tokens > EVAL_START:
        raise MoefyError(
            f"stats_tokens must be at most {EVAL_START}: LICENSE tokens {EVAL_START}..{EVAL_END - 1} are held out"
        )
    per_expert = round((1 - shared_fraction) * n_neurons / num_experts / EXPERT_ALIGN) * EXPERT_ALIGN
    per_expert = min(max(per_expert, EXPERT_ALIGN), n_neurons // num_experts // EXPERT_ALIGN * EXPERT_ALIGN)
    return n_neurons - num_experts * per_expert, per_expert


def _cache_dir(num_experts: int, top_k: int, shared_fraction: float, stats_tokens: int) -> Path:
    shared, _ = _split(SMOLLM2_FFN_NEURONS, num_experts, top_k, shared_fraction, stats_tokens)
    name = f"SmolLM2-135M-MoE-{num_experts}x{top_k}-s{shared / SMOLLM2_FFN_NEURONS:.3f}"
    if stats_tokens != DEFAULT_STATS_TOKENS:
        name += f"-t{stats_tokens}"
    return cache_root() / f"{name}-v{_CACHE_VERSION}"


# ---------------------------------------------------------------------- statistics
def _license_ids(tokenizer: Any) -> torch.Tensor:
    text = _REPO_LICENSE.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < EVAL_END:
        raise MoefyError(f"{_REPO_LICENSE} has {ids.numel()} tokens; need at least {EVAL_END}")
    return ids


def _chat_sequences(model: Any, tokenizer: Any) -> list[torch.Tensor]:
    """Greedy replies of the dense model to CHAT_PROMPTS: one token tensor (prompt + reply) each."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in CHAT_PROMPTS
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=CHAT_NEW_TOKENS,
            do_sample=False,
            repetition_penalty=1.2,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    seqs = []
    prompt_len = enc.input_ids.shape[1]
    eos = tokenizer.eos_token_id
    for row, mask in zip(out, enc.attention_mask):
        prompt = row[:prompt_len][mask.bool()]
        reply = row[prompt_len:]
        if eos is not None and (reply == eos).any():
            reply = reply[: int((reply == eos).nonzero()[0]) + 1]
        seqs.append(torch.cat([prompt, reply]))
    return seqs


class _Recorder:
    """Forward hooks on every FFN that record its input x and activations a = silu(gate(x)) * up(x)."""

    def __init__(self, layers: Any):
        self.x: list[list[torch.Tensor]] = [[] for _ in layers]
        self.a: list[list[torch.Tensor]] = [[] for _ in layers]
        self._handles = [layer.mlp.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int) -> Callable:
        def hook(mlp: Any, args: tuple, output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            self.x[i].append(x.detach().clone())
            self.a[i].append(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

        return hook

    def remove(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for h in self._handles:
            h.remove()
        return [torch.cat(v) for v in self.x], [torch.cat(v) for v in self.a]


def _perplexity(model: Any, ids: torch.Tensor, window: int = STATS_WINDOW) -> float:
    """Non-overlapping windows, each scored on its own; NLL summed in float64."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window]
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[None], use_cache=False).logits[0].float()
            nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").double().item()
            count += chunk.numel() - 1
    return math.exp(nll / count)


# ---------------------------------------------------------------------- partition and router
def _balanced_assign(dist: torch.Tensor, cap: int) -> torch.Tensor:
    """Assign rows to columns, exactly `cap` rows per column, preferring small distances.

    Rounds of proposals: every unassigned row proposes to its nearest column with room; a column
    accepts its closest proposers up to its room. Vectorised apart from a loop over columns."""
    n, k = dist.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), cap, dtype=torch.long)
    while True:
        free = torch.nonzero(labels < 0).flatten()
        if free.numel() == 0:
            return labels
        d = dist[free].clone()
        d[:, room == 0] = float("inf")
        best = d.argmin(1)
        best_d = d.gather(1, best[:, None])[:, 0]
        for col in torch.unique(best).tolist():
            sel = best == col
            take = free[sel][torch.argsort(best_d[sel], stable=True)[: int(room[col])]]
            labels[take] = col
            room[col] -= take.numel()


def _balanced_kmeans(points: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = SEED) -> torch.Tensor:
    """Balanced k-means: labels with exactly len(points) / k points per cluster."""
    n = points.shape[0]
    cap = n // k
    gen = torch.Generator().manual_seed(seed)
    centres = points[torch.randperm(n, generator=gen)[:k]].clone()
    labels = None
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(points, centres), cap)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.zeros_like(centres).index_add_(0, labels, points) / cap
    return labels


def _group_norms(a: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[T, E]: the activation norm of each neuron group (groups: [E, n] neuron indices)."""
    return a[:, groups].norm(dim=2)


def _partition(
    a: torch.Tensor, down: torch.Tensor, n_shared: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared neuron indices [S], routed groups [E, n]) for one layer, all sorted ascending."""
    mag = a.abs()
    contribution = mag.mean(0) * down.norm(dim=0)
    order = torch.argsort(contribution, descending=True, stable=True)
    shared = order[:n_shared].sort().values
    rest = order[n_shared:].sort().values
    feats = mag[:, rest].T
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = _balanced_kmeans(feats, num_experts)
    groups = torch.stack([rest[labels == e] for e in range(num_experts)])
    # Order experts by their smallest neuron index so the layout does not depend on k-means labels.
    groups = groups[torch.argsort(groups[:, 0])]
    return shared, groups


def _fit_router(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Ridge least squares hidden -> E onto the per-token centred log group norms; logit std ROUTER_LOGIT_STD."""
    x = x.double()
    target = (norms.double() + 1e-4 * norms.double().mean()).log()
    target = target - target.mean(1, keepdim=True)
    gram = x.T @ x
    ridge = ROUTER_RIDGE * gram.diagonal().mean()
    w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ target).T
    std = (x @ w.T).std()
    return (w * (ROUTER_LOGIT_STD / std.clamp_min(1e-30))).float()


def _agreement(router: torch.Tensor, x: torch.Tensor, norms: torch.Tensor, k: int) -> float:
    oracle = torch.zeros_like(norms).scatter_(1, norms.topk(k, 1).indices, 1.0)
    picked = torch.zeros_like(norms).scatter_(1, (x @ router.T).topk(k, 1).indices, 1.0)
    return float((oracle * picked).sum() / oracle.sum())


def _oracle_perplexity(model: Any, ids: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> float:
    """Perplexity of the dense model with each FFN keeping only its shared neurons and oracle top-k groups."""
    layers = model.model.layers

    def masked(mlp: Any, shared: torch.Tensor, groups: torch.Tensor) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            a = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            flat = a.reshape(-1, a.shape[-1])
            top = _group_norms(flat, groups).topk(k, 1).indices
            keep = torch.zeros(flat.shape, dtype=torch.bool)
            keep[:, shared] = True
            keep.scatter_(1, groups[top].reshape(flat.shape[0], -1), True)
            return mlp.down_proj((flat * keep).reshape(a.shape))

        return forward

    try:
        for layer, (shared, groups) in zip(layers, parts):
            layer.mlp.forward = masked(layer.mlp, shared, groups)
        return _perplexity(model, ids)
    finally:
        for layer in layers:
            layer.mlp.__dict__.pop("forward", None)


# ---------------------------------------------------------------------- the MoE checkpoint
def _moe_config(dense_cfg: Any, num_experts: int, top_k: int, n_shared: int, per_expert: int) -> Any:
    from transformers import Qwen2MoeConfig

    rope = dict(getattr(dense_cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", getattr(dense_cfg, "rope_theta", 10000.0))
    return Qwen2MoeConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads,
        hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        tie_word_embeddings=dense_cfg.tie_word_embeddings,
        rope_parameters=rope,
        use_sliding_window=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=per_expert,
        shared_expert_intermediate_size=n_shared,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        qkv_bias=False,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id,
    )


def _build_moe(dense: Any, config: Any, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import Qwen2MoeForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element init when shared_fraction == 0
        moe = Qwen2MoeForCausalLM(config)
    k = config.num_experts_per_tok
    state = {n: t for n, t in dense.state_dict().items() if ".mlp." not in n}
    for i, ((shared, groups, router), layer) in enumerate(zip(layers, dense.model.layers)):
        gate, up, down = (getattr(layer.mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj"))
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = router
        state[p + "experts.gate_up_proj"] = torch.cat([gate[groups], up[groups]], dim=1)  # [E, 2I, H]
        state[p + "experts.down_proj"] = down[:, groups].permute(1, 0, 2) * k  # [E, H, I]
        state[p + "shared_expert.gate_proj.weight"] = gate[shared]
        state[p + "shared_expert.up_proj.weight"] = up[shared]
        state[p + "shared_expert.down_proj.weight"] = down[:, shared] * 2.0  # sigmoid(0) = 0.5
        state[p + "shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size)
    state = {n: t.contiguous().clone() for n, t in state.items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [n for n in missing if n != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"MoE weights do not line up: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    return moe.eval()


def moefy(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    num_experts: int,
    top_k: int,
    shared_fraction: float,
    stats_tokens: int,
    progress: Progress | None = None,
    chat_stats: bool = True,
) -> dict[str, Any]:
    """Convert the dense llama-style SwiGLU model in `dense_dir` into a Qwen2-MoE checkpoint in `out_dir`.

    `num_experts` routed experts per layer (must divide the FFN width), `top_k` of them active per
    token, `shared_fraction` of the neurons in the always-on shared expert (rounded so each routed
    expert holds a multiple of 8 neurons), statistics from LICENSE tokens 0..`stats_tokens` (at most 2048) plus, with
    `chat_stats`, the model's own replies to `CHAT_PROMPTS`. `progress(stage, done, total)` is called
    as the work advances. Writes the model, tokenizer, chat template and `moefy_report.json`;
    returns the report. Raises `MoefyError` for bad settings."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.perf_counter()
    total = 6
    say = progress or (lambda stage, done, total: None)
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)

    cfg = AutoConfig.from_pretrained(dense_dir)
    if cfg.model_type not in _DENSE_TYPES or cfg.hidden_act != "silu":
        raise MoefyError(f"{dense_dir} is a {cfg.model_type!r} model; moefy needs a llama-style SwiGLU model")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise MoefyError(f"{dense_dir} has attention or MLP biases, which Qwen2-MoE cannot hold")
    if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads):
        raise MoefyError(f"{dense_dir} has head_dim != hidden_size / heads, which Qwen2-MoE cannot hold")
    n_shared, per_expert = _split(cfg.intermediate_size, num_experts, top_k, shared_fraction, stats_tokens)
    say("loading the dense model", 0, total)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    dense.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    ids = _license_ids(tokenizer)
    eval_ids = ids[EVAL_START:EVAL_END]

    chat: list[torch.Tensor] = []
    if chat_stats:
        say(f"generating replies to {len(CHAT_PROMPTS)} prompts", 1, total)
        chat = _chat_sequences(dense, tokenizer)

    say("collecting FFN activations", 2, total)
    rec = _Recorder(dense.model.layers)
    try:
        with torch.inference_mode():
            for start in range(0, stats_tokens, STATS_WINDOW):
                dense(input_ids=ids[start : min(start + STATS_WINDOW, stats_tokens)][None], use_cache=False)
            for seq in chat:
                dense(input_ids=seq[None], use_cache=False)
    finally:
        xs, acts = rec.remove()
    chat_tokens = sum(s.numel() for s in chat)

    say("held-out pass: dense perplexity", 3, total)
    rec = _Recorder(dense.model.layers)
    try:
        ppl_dense = _perplexity(dense, eval_ids)
    finally:
        eval_xs, eval_acts = rec.remove()

    layers, parts, agree = [], [], []
    n_layers = len(dense.model.layers)
    for i, layer in enumerate(dense.model.layers):
        say(f"clustering and fitting the router, layer {i + 1}/{n_layers}", 3, total)
        shared, groups = _partition(acts[i], layer.mlp.down_proj.weight, n_shared, num_experts)
        router = _fit_router(xs[i], _group_norms(acts[i], groups))
        agree.append(_agreement(router, eval_xs[i], _group_norms(eval_acts[i], groups), top_k))
        layers.append((shared, groups, router))
        parts.append((shared, groups))
    del xs, acts, eval_xs, eval_acts

    say("held-out pass: oracle and MoE perplexity", 4, total)
    ppl_oracle = _oracle_perplexity(dense, eval_ids, parts, top_k)
    moe = _build_moe(dense, _moe_config(cfg, num_experts, top_k, n_shared, per_expert), layers)
    del dense
    ppl_moe = _perplexity(moe, eval_ids)

    say("saving", 5, total)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        moe.generation_config = GenerationConfig.from_pretrained(dense_dir)
    except OSError:
        pass
    moe.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = cfg.intermediate_size
    report = {
        "format": "qwen2_moe",
        "source": str(dense_dir),
        "num_experts": num_experts,
        "top_k": top_k,
        "shared_fraction": n_shared / n,
        "shared_fraction_requested": shared_fraction,
        "shared_neurons": n_shared,
        "neurons_per_expert": per_expert,
        "ffn_neurons": n,
        "active_share": (n_shared + top_k * per_expert) / n,
        "stats_tokens_license": stats_tokens,
        "stats_tokens_chat": chat_tokens,
        "eval_text": f"LICENSE tokens {EVAL_START}..{EVAL_END - 1}",
        "ppl_dense": ppl_dense,
        "ppl_moe": ppl_moe,
        "ppl_oracle_routing": ppl_oracle,
        "ppl_ratio": ppl_moe / ppl_dense,
        "router_agreement": sum(agree) / len(agree),
        "router_agreement_per_layer": agree,
        "router_logit_std": ROUTER_LOGIT_STD,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    (out_dir / "moefy_report.json").write_text(json.dumps(report, indent=2) + "\n")
    say("done", total, total)
    return report


def _is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "moefy_report.json").is_file()


def moefied_model_path(
    num_experts: int = DEFAULT_NUM_EXPERTS,
    top_k: int = DEFAULT_TOP_K,
    shared_fraction: float = DEFAULT_SHARED_FRACTION,
    progress: Progress | None = None,
    *,
    stats_tokens: int = DEFAULT_STATS_TOKENS,
) -> Path:
    """The MoEfied default model's directory, built once (a few minutes) and cached under `cache_root()`."""
    from ..transformers_adapter.default_model import default_model_path

    target = _cache_dir(num_experts, top_k, shared_fraction, stats_tokens)
    if _is_built(target):
        return target
    dense = default_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private directory and rename it into place, so a crash or a concurrent
    # process never leaves a half-written cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".moefy-", dir=target.parent))
    try:
        moefy(
            dense,
            tmp,
            num_experts=num_experts,
            top_k=top_k,
            shared_fraction=shared_fraction,
            stats_tokens=stats_tokens,
            progress=progress,
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "moefy_report.json").is_file():
                raise
            # Another process finished first; its build is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------- CLI
def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `torus-sparse moefy` on an argparse subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "moefy",
        help="build a Qwen2-MoE test model with real routing from the embedded SmolLM2 (cached)",
        description="Split each FFN of the embedded SmolLM2-135M-Instruct into a shared expert plus routed "
        "experts with a fitted router, save it as a Qwen2-MoE checkpoint and print perplexity dense vs MoE.",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=DEFAULT_NUM_EXPERTS,
        help=f"routed experts per layer (default {DEFAULT_NUM_EXPERTS})",
    )
    p.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help=f"experts active per token (default {DEFAULT_TOP_K})"
    )
    p.add_argument(
        "--shared-fraction",
        type=float,
        default=DEFAULT_SHARED_FRACTION,
        help=f"share of FFN neurons in the always-on shared expert, rounded so experts hold multiples of {EXPERT_ALIGN} (default {DEFAULT_SHARED_FRACTION:.3g})",
    )
    p.add_argument(
        "--stats-tokens",
        type=int,
        default=DEFAULT_STATS_TOKENS,
        help=f"LICENSE tokens for statistics, at most {EVAL_START} (default {DEFAULT_STATS_TOKENS})",
    )
    p.add_argument("--out", help="write the model here (an empty or new folder) instead of the cache")
    p.set_defaults(func=_cmd_moefy)
    return p


def _cmd_moefy(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    try:
        _split(SMOLLM2_FFN_NEURONS, args.experts, args.top_k, args.shared_fraction, args.stats_tokens)
        out = Path(args.out) if args.out else None
        if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MoefyError(f"--out {out} exists and is not an empty folder")
        report = _run_with_progress(args, out, err)
    except MoefyError as exc:
        err.print(f"torus-sparse moefy: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    _print_report(report)
    return 0


def _run_with_progress(args: argparse.Namespace, out: Path | None, err: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    from ..transformers_adapter.default_model import default_model_path

    settings = dict(num_experts=args.experts, top_k=args.top_k, shared_fraction=args.shared_fraction)
    target = out if out is not None else _cache_dir(stats_tokens=args.stats_tokens, **settings)
    if out is None and _is_built(target):
        err.print(f"cached: {target}", markup=False, highlight=False)
    else:
        hf_logging.disable_progress_bar()
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("starting", total=6)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total)

            if out is not None:
                moefy(default_model_path(), out, stats_tokens=args.stats_tokens, progress=progress, **settings)
            else:
                target = moefied_model_path(progress=progress, stats_tokens=args.stats_tokens, **settings)
    report = json.loads((target / "moefy_report.json").read_text())
    report["path"] = str(target)
    return report


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MoEfied SmolLM2-135M (Qwen2-MoE)", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    rows = [
        ("model", report.get("path", "")),
        ("experts × top-k", f"{report['num_experts']} × {report['top_k']}"),
        ("shared expert", f"{report['shared_neurons']} neurons ({report['shared_fraction']:.1%})"),
        ("neurons per expert", str(report["neurons_per_expert"])),
        ("active FFN neurons", f"{report['active_share']:.1%}"),
        ("perplexity dense", f"{report['ppl_dense']:.2f}"),
        ("perplexity MoE (router)", f"{report['ppl_moe']:.2f} ({report['ppl_ratio']:.2f}× dense)"),
        ("perplexity oracle routing", f"{report['ppl_oracle_routing']:.2f}"),
        ("router agreement", f"{report['router_agreement']:.1%} of oracle top-k (held-out)"),
        ("eval text", report["eval_text"]),
        ("statistics", f"{report['stats_tokens_license']} LICENSE + {report['stats_tokens_chat']} chat tokens"),
        ("build time", f"{report['seconds']:.0f} s"),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, value)
    Console().print(table)
