"""Training and evaluating the learned expert predictor from recorded routing traces.

A tool's module (`torus-sparse train-predictor` runs it), kept apart from the runtime net in
`predictor_net`: attaching a model never imports the trainer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .predictor_net import (
    FORMAT_VERSION,
    TRACES_FORMAT,
    TRAIN_HINT,
    ExpertPredictorNet,
    PredictorFingerprint,
    Progress,
    _check_format,
    _read_safetensors,
    _write_safetensors,
)

# --------------------------------------------------------------------------------------------
# routing traces


@dataclass
class RoutingTraces:
    """Recorded routing: for N tokens and each of L MoE layers, the router input and the routed experts.

    hidden: float32 [N, L, H]; experts: int64 [N, L, top_k]. Token order is recording order (held-out
    splits take the last tokens).
    """

    hidden: Tensor
    experts: Tensor
    fingerprint: PredictorFingerprint

    def __post_init__(self) -> None:
        fp = self.fingerprint
        if self.hidden.dim() != 3 or self.experts.dim() != 3:
            raise ConfigError(
                f"traces must be hidden [N, L, H] and experts [N, L, k], got {tuple(self.hidden.shape)} "
                f"and {tuple(self.experts.shape)}"
            )
        n, layers, hidden = self.hidden.shape
        if (layers, hidden) != (fp.num_moe_layers, fp.hidden_size):
            raise ConfigError(
                f"traces hidden shape {tuple(self.hidden.shape)} does not match the fingerprint "
                f"(num_moe_layers={fp.num_moe_layers}, hidden_size={fp.hidden_size})"
            )
        if tuple(self.experts.shape) != (n, layers, fp.top_k):
            raise ConfigError(
                f"traces experts shape {tuple(self.experts.shape)} should be {(n, layers, fp.top_k)} "
                f"(N, num_moe_layers, top_k)"
            )
        self.hidden = self.hidden.float()
        self.experts = self.experts.long()
        if self.experts.numel() and (int(self.experts.min()) < 0 or int(self.experts.max()) >= fp.num_experts):
            raise ConfigError(f"traces hold expert ids outside [0, {fp.num_experts})")

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {"format": TRACES_FORMAT, "format_version": str(FORMAT_VERSION), **self.fingerprint.as_metadata()}
        _write_safetensors(path, {"hidden": self.hidden, "experts": self.experts}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTraces:
        tensors, meta = _read_safetensors(path, "routing traces")
        _check_format(meta, path, TRACES_FORMAT, "routing traces file")
        if set(tensors) != {"hidden", "experts"}:
            raise ConfigError(f"routing traces file {str(path)!r} is corrupt: tensors {sorted(tensors)}")
        return cls(tensors["hidden"], tensors["experts"], PredictorFingerprint.from_metadata(meta))


# --------------------------------------------------------------------------------------------
# evaluation


def _hits(ranked: Tensor, true: Tensor) -> Tensor:
    """ranked [..., K] predicted ids, true [..., k] routed ids → number of predicted ids routed [...]."""
    return (ranked[..., :, None] == true[..., None, :]).any(-1).sum(-1)


def _pairs(tokens: range, num_layers: int) -> tuple[Tensor, Tensor]:
    """(token, layer) index pairs for every token in `tokens` and every layer that has a next layer."""
    n = torch.arange(tokens.start, tokens.stop)
    j = torch.arange(num_layers - 1)
    return n.repeat_interleave(num_layers - 1), j.repeat(len(n))


def _score_table(
    ranked_by_step: list[Tensor], true_by_step: list[Tensor], ks: tuple[int, ...], top_k: int
) -> dict[int, dict[str, float]]:
    table: dict[int, dict[str, float]] = {}
    for s, (ranked, true) in enumerate(zip(ranked_by_step, true_by_step), start=1):
        row: dict[str, float] = {}
        for k in ks:
            hits = _hits(ranked[:, :k], true).float()
            row[f"recall@{k}"] = float(hits.mean() / top_k) if hits.numel() else float("nan")
            row[f"precision@{k}"] = float(hits.mean() / k) if hits.numel() else float("nan")
        table[s] = row
    return table


def _ks(fp: PredictorFingerprint) -> tuple[int, ...]:
    return tuple(sorted({min(fp.top_k, fp.num_experts), min(2 * fp.top_k, fp.num_experts)}))


@torch.no_grad()
def evaluate_predictor(
    net: ExpertPredictorNet, traces: RoutingTraces, tokens: range | None = None, *, batch_size: int = 4096
) -> dict[int, dict[str, float]]:
    """Per-token recall@k / precision@k (k = top_k and 2*top_k) of `net` on `traces`.

    Returns {step s: {"recall@k": ..., "precision@k": ...}}, averaged over every (token, layer j)
    with j+s a MoE layer. recall@k = routed experts among the k best-scored / top_k;
    precision@k = the same count / k.
    """
    fp = traces.fingerprint
    tokens = range(traces.num_tokens) if tokens is None else tokens
    L = fp.num_moe_layers
    ks = _ks(fp)
    device = net.in_mean.device
    n_idx, j_idx = _pairs(tokens, L)
    ranked_parts = []
    for start in range(0, len(n_idx), batch_size):
        n, j = n_idx[start : start + batch_size], j_idx[start : start + batch_size]
        logits, *_ = net(j.to(device), traces.hidden[n, j].to(device=device, dtype=net.in_mean.dtype))
        ranked_parts.append(logits.topk(max(ks), dim=-1).indices.cpu())
    ranked = torch.cat(ranked_parts) if ranked_parts else torch.empty(0, net.horizon, max(ks), dtype=torch.long)
    ranked_by_step, true_by_step = [], []
    for s in range(1, net.horizon + 1):
        valid = j_idx + s < L
        ranked_by_step.append(ranked[valid, s - 1])
        true_by_step.append(traces.experts[n_idx[valid], j_idx[valid] + s])
    return _score_table(ranked_by_step, true_by_step, ks, fp.top_k)


def frequency_prior_baseline(
    traces: RoutingTraces, train_tokens: range, eval_tokens: range, horizon: int
) -> dict[int, dict[str, float]]:
    """The same metrics for always guessing each layer's most frequently routed experts (in `train_tokens`)."""
    fp = traces.fingerprint
    L, E = fp.num_moe_layers, fp.num_experts
    ks = _ks(fp)
    counts = torch.zeros(L, E)
    routed = traces.experts[train_tokens.start : train_tokens.stop]  # [n, L, k]
    counts.scatter_add_(1, routed.permute(1, 0, 2).reshape(L, -1), torch.ones(L, routed.shape[0] * fp.top_k))
    # ties broken by a tiny expert-id term, so the ranking is deterministic
    order = (counts - torch.arange(E) * 1e-6).topk(max(ks), dim=-1).indices  # [L, K]
    n_idx, j_idx = _pairs(eval_tokens, L)
    ranked_by_step, true_by_step = [], []
    for s in range(1, horizon + 1):
        valid = j_idx + s < L
        ranked_by_step.append(order[j_idx[valid] + s])
        true_by_step.append(traces.experts[n_idx[valid], j_idx[valid] + s])
    return _score_table(ranked_by_step, true_by_step, ks, fp.top_k)


def uniform_random_baseline(fp: PredictorFingerprint, horizon: int) -> dict[int, dict[str, float]]:
    """Expected metrics of guessing k experts uniformly at random: recall k/E, precision top_k/E."""
    row = {}
    for k in _ks(fp):
        row[f"recall@{k}"] = k / fp.num_experts
        row[f"precision@{k}"] = fp.top_k / fp.num_experts
    return {s: dict(row) for s in range(1, horizon + 1)}


# --------------------------------------------------------------------------------------------
# training


def _check_matches(found: PredictorFingerprint, expected: PredictorFingerprint, what: str) -> None:
    diffs = found.differences(expected)
    if diffs:
        listed = "; ".join(f"{name}: {what} {a!r}, model {b!r}" for name, a, b in diffs)
        raise ConfigError(f"{what} was made for a different model ({listed}); {TRAIN_HINT}")


def train_predictor(
    traces: RoutingTraces,
    fingerprint: PredictorFingerprint,
    *,
    horizon: int = 2,
    dict_size: int | None = None,
    code_k: int | None = None,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 3e-3,
    recon_weight: float = 0.5,
    l1_weight: float = 1e-3,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> tuple[ExpertPredictorNet, dict]:
    """Train an `ExpertPredictorNet` on `traces`; returns (net on the CPU in eval mode, report).

    Loss per (token, MoE layer j) sample: multi-label BCE on the experts routed at layers
    j+1..j+horizon (steps past the last layer masked) + recon_weight * SAE reconstruction MSE (on the
    normalised input) + l1_weight * mean |code|. Adam, cosine-decayed learning rate. The last
    `heldout_fraction` of tokens (at least one) is held out; the report holds, per horizon step,
    recall@k / precision@k for k = top_k and 2*top_k of the predictor, of the frequency prior (each
    layer's most routed experts in the training part) and of a uniform random guess, on held-out
    tokens, plus the predictor's own figures on the training tokens. `progress(step, total_steps)`.
    """
    _check_matches(traces.fingerprint, fingerprint, "the traces")
    fp = fingerprint
    L, E = fp.num_moe_layers, fp.num_experts
    if horizon < 1:
        raise ConfigError(f"horizon must be at least 1, got {horizon}")
    if L < 2:
        raise ConfigError(f"the model has {L} MoE layer; predicting the next layer needs at least 2")
    if horizon > L - 1:
        raise ConfigError(f"horizon {horizon} reaches past the last MoE layer (the model has {L}); use at most {L - 1}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    N = traces.num_tokens
    n_held = max(1, int(N * heldout_fraction))
    n_train = N - n_held
    if n_train < 1:
        raise ConfigError(f"{N} traced tokens are too few to train on (need at least 2)")
    train_tokens, held_tokens = range(n_train), range(n_train, N)
    device = torch.device(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ExpertPredictorNet(L, fp.hidden_size, E, horizon=horizon, dict_size=dict_size, code_k=code_k)
        gen = torch.Generator().manual_seed(seed)
    net.fingerprint = fp
    train_hidden = traces.hidden[:n_train]
    with torch.no_grad():
        net.in_mean.copy_(train_hidden.mean(0))
        std = train_hidden.std(0, unbiased=False)
        net.in_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    net.to(device).train()

    n_idx, j_idx = _pairs(train_tokens, L)
    steps_per_epoch = math.ceil(len(n_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    offsets = torch.arange(1, horizon + 1)
    step = 0
    last: dict[str, float] = {}
    for _ in range(epochs):
        perm = torch.randperm(len(n_idx), generator=gen)
        sums = torch.zeros(4)
        for start in range(0, len(perm), batch_size):
            sel = perm[start : start + batch_size]
            n, j = n_idx[sel], j_idx[sel]
            tgt_layer = j[:, None] + offsets[None, :]  # [B, h]
            mask = tgt_layer < L
            routed = traces.experts[n[:, None], tgt_layer.clamp(max=L - 1)]  # [B, h, k]
            target = torch.zeros(len(n), horizon, E).scatter_(-1, routed, 1.0)
            x_raw = traces.hidden[n, j].to(device)
            logits, recon, code, x = net(j.to(device), x_raw)
            mask_d, target = mask.to(device), target.to(device)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
            bce = (bce * mask_d).sum() / mask_d.sum()
            rec = F.mse_loss(recon, x)
            l1 = code.abs().mean()
            loss = bce + recon_weight * rec + l1_weight * l1
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([loss, bce, rec, l1]).detach().cpu() * len(n)
            step += 1
            if progress is not None:
                progress(step, total_steps)
        mean = (sums / len(n_idx)).tolist()
        last = {"total": mean[0], "bce": mean[1], "reconstruction_mse": mean[2], "code_l1": mean[3]}

    net.eval().cpu()
    with torch.no_grad():
        hn, hj = _pairs(held_tokens, L)
        _, h_recon, h_code, h_x = net(hj, traces.hidden[hn, hj])
        held_recon = float(F.mse_loss(h_recon, h_x))
        active = float((h_code > 0).float().sum(-1).mean())
    eval_train = range(max(0, n_train - 4096), n_train)  # the last 4096 training tokens are plenty
    report = {
        "fingerprint": fp.as_metadata(),
        "tokens": {"train": n_train, "heldout": n_held},
        **net.hyperparameters(),
        "epochs": epochs,
        "steps": total_steps,
        "final_epoch_loss": last,
        "heldout_reconstruction_mse": held_recon,
        "heldout_active_codes": active,
        "heldout": {
            "predictor": evaluate_predictor(net, traces, held_tokens),
            "frequency_prior": frequency_prior_baseline(traces, train_tokens, held_tokens, horizon),
            "uniform_random": uniform_random_baseline(fp, horizon),
        },
        "train": {"predictor": evaluate_predictor(net, traces, eval_train)},
    }
    return net, report
