"""A learned MoE expert predictor: which experts the next MoE layers will route to.

From the router input (hidden state) at MoE layer j, `ExpertPredictorNet` scores the experts of
MoE layers j+1..j+horizon, so the engine can prefetch them before their router runs. The net is a
sparse autoencoder over hidden states (its sparse code is the feature) plus a small MLP head that
also sees a learned embedding of j. It is trained from `RoutingTraces` recorded on the real model
(`torus_adapters.routing_traces.record_traces`) and stored as safetensors, never pickle.

This module imports torch only; `safetensors.torch` is imported inside the save/load functions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

PREDICTOR_FORMAT = "torus-sparse-expert-predictor"
TRACES_FORMAT = "torus-sparse-routing-traces"
FORMAT_VERSION = 1

TRAIN_HINT = "train one for this model with `torus-sparse train-predictor --model MODEL --out FILE.safetensors`"

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# fingerprint


@dataclass(frozen=True)
class PredictorFingerprint:
    """What a predictor (or a set of traces) was made for; must match the model it serves."""

    model_type: str
    num_moe_layers: int
    num_experts: int
    hidden_size: int
    top_k: int

    def __post_init__(self) -> None:
        for name in ("num_moe_layers", "num_experts", "hidden_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"fingerprint {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"fingerprint top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")

    def as_metadata(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> PredictorFingerprint:
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in meta:
                raise ConfigError(f"metadata has no fingerprint field {f.name!r}")
            raw = meta[f.name]
            if f.name == "model_type":
                values[f.name] = str(raw)
                continue
            try:
                values[f.name] = int(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"metadata fingerprint field {f.name!r} is not an integer: {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    def differences(self, other: PredictorFingerprint) -> list[tuple[str, object, object]]:
        """(field, self's value, other's value) for each field that differs."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


# --------------------------------------------------------------------------------------------
# the net


def default_dict_size(hidden_size: int) -> int:
    """4x the hidden size, capped at 2048 so the predictor stays small next to the model."""
    return min(4 * hidden_size, 2048)


class ExpertPredictorNet(nn.Module):
    """Sparse autoencoder over router inputs + an MLP head scoring the experts of the next layers.

    encode: x = (hidden - mean[j]) / scale[j]; code = top-k(ReLU(W_enc x + b_enc)) (k = code_k;
    code_k=0 keeps every positive unit, sparsity then comes from the L1 term alone);
    decode: W_dec code + b_dec ≈ x. Head: MLP(cat(code, embedding[j])) → logits [horizon, E],
    row s-1 for MoE layer j+s. Rows for layers past the last MoE layer are -inf.
    """

    def __init__(
        self,
        num_moe_layers: int,
        hidden_size: int,
        num_experts: int,
        *,
        horizon: int = 2,
        dict_size: int | None = None,
        code_k: int | None = None,
        layer_dim: int = 32,
        head_dim: int = 256,
    ) -> None:
        super().__init__()
        if horizon < 1:
            raise ConfigError(f"horizon must be at least 1, got {horizon}")
        dict_size = default_dict_size(hidden_size) if dict_size is None else dict_size
        if dict_size < 1:
            raise ConfigError(f"dict_size must be at least 1, got {dict_size}")
        code_k = max(1, min(64, dict_size // 8)) if code_k is None else code_k
        if not 0 <= code_k <= dict_size:
            raise ConfigError(f"code_k must be in [0, dict_size={dict_size}], got {code_k}")
        self.num_moe_layers = num_moe_layers
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.horizon = horizon
        self.dict_size = dict_size
        self.code_k = code_k
        self.layer_dim = layer_dim
        self.head_dim = head_dim
        self.fingerprint: PredictorFingerprint | None = None  # set by train_predictor / load_predictor

        self.register_buffer("in_mean", torch.zeros(num_moe_layers, hidden_size))
        self.register_buffer("in_scale", torch.ones(num_moe_layers, hidden_size))
        steps = torch.arange(num_moe_layers)[:, None] + torch.arange(1, horizon + 1)[None, :]
        self.register_buffer("past_end", (steps >= num_moe_layers)[:, :, None], persistent=False)

        self.encoder = nn.Linear(hidden_size, dict_size)
        self.decoder = nn.Linear(dict_size, hidden_size)
        self.layer_embedding = nn.Embedding(num_moe_layers, layer_dim)
        self.head = nn.Sequential(
            nn.Linear(dict_size + layer_dim, head_dim),
            nn.GELU(),
            nn.Linear(head_dim, head_dim),
            nn.GELU(),
            nn.Linear(head_dim, horizon * num_experts),
        )
        with torch.no_grad():  # decoder columns start unit-norm, the encoder as their transpose
            self.decoder.weight.copy_(F.normalize(self.decoder.weight, dim=0))
            self.encoder.weight.copy_(self.decoder.weight.t())
            self.decoder.bias.zero_()
            self.encoder.bias.zero_()

    def normalize(self, layer: Tensor, hidden: Tensor) -> Tensor:
        return (hidden - self.in_mean[layer]) / self.in_scale[layer]

    def encode(self, x: Tensor) -> Tensor:
        """Sparse code of normalised inputs `x` [B, H] → [B, D]."""
        pre = F.relu(self.encoder(x))
        if 0 < self.code_k < self.dict_size:
            values, index = pre.topk(self.code_k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, index, values)
        return pre

    def _head(self, layer: Tensor, code: Tensor) -> Tensor:
        emb = self.layer_embedding(layer)
        return self.head(torch.cat([code, emb], dim=-1)).view(-1, self.horizon, self.num_experts)

    def forward(self, layer: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-token training forward. layer [B] (MoE layer index), hidden [B, H] (raw router input).

        Returns (logits [B, horizon, E], reconstruction [B, H], code [B, D], normalised input [B, H]).
        Rows past the last MoE layer are not masked here (the loss masks them).
        """
        x = self.normalize(layer, hidden)
        code = self.encode(x)
        return self._head(layer, code), self.decoder(code), code, x

    @torch.no_grad()
    def predict(self, j: int, hidden: Tensor) -> Tensor:
        """Scores [horizon, E] for MoE layers j+1..j+horizon from the router input at MoE layer j.

        hidden: [T, H] (or [H], or anything whose last dim is H). With T=1 the result is the logits;
        with T>1 it is the max over tokens of the logits, i.e. the logit of the largest per-token
        probability: an expert scores high if any token is likely to need it. Rows for layers past
        the last MoE layer are -inf. Runs on the net's device and dtype, without autograd.
        """
        if not 0 <= j < self.num_moe_layers:
            raise IndexError(f"MoE layer index {j} out of range [0, {self.num_moe_layers})")
        mean = self.in_mean[j]
        x = (hidden.reshape(-1, self.hidden_size).to(device=mean.device, dtype=mean.dtype) - mean) / self.in_scale[j]
        code = self.encode(x)
        emb = self.layer_embedding.weight[j].expand(code.shape[0], -1)
        logits = self.head(torch.cat([code, emb], dim=-1)).view(-1, self.horizon, self.num_experts)
        return logits.amax(dim=0).masked_fill_(self.past_end[j], float("-inf"))

    def hyperparameters(self) -> dict[str, int]:
        return {
            "horizon": self.horizon,
            "dict_size": self.dict_size,
            "code_k": self.code_k,
            "layer_dim": self.layer_dim,
            "head_dim": self.head_dim,
        }


# --------------------------------------------------------------------------------------------
# safetensors helpers


def _read_safetensors(path: str | os.PathLike[str], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} path {str(p)!r} is not a file")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncation
        raise ConfigError(
            f"{what} file {str(p)!r} is not a valid safetensors file (corrupt, truncated, or another format "
            f"such as a pickled .pt/.bin file, which torus-sparse never loads): {exc}"
        ) from None
    return tensors, meta


def _write_safetensors(path: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def _check_format(meta: Mapping[str, str], path: str | os.PathLike[str], fmt: str, what: str) -> None:
    found = meta.get("format")
    if found != fmt:
        raise ConfigError(
            f"{str(path)!r} is a safetensors file but not a torus-sparse {what} "
            f"(metadata format={found!r}, expected {fmt!r})"
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ConfigError(f"{what} file {str(path)!r} has a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{what} file {str(path)!r} has format version {version}, newer than this torus-sparse "
            f"reads ({FORMAT_VERSION}); upgrade torus-sparse or re-create the file"
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


# --------------------------------------------------------------------------------------------
# predictor files


_RESERVED = {"format", "format_version", "horizon", "dict_size", "code_k", "layer_dim", "head_dim"} | {
    f.name for f in fields(PredictorFingerprint)
}


def save_predictor(
    path: str | os.PathLike[str],
    net: ExpertPredictorNet,
    fingerprint: PredictorFingerprint,
    horizon: int,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `net` as a safetensors file whose metadata holds the fingerprint, horizon, sizes and format version."""
    dims = (fingerprint.num_moe_layers, fingerprint.hidden_size, fingerprint.num_experts)
    if (net.num_moe_layers, net.hidden_size, net.num_experts) != dims:
        raise ConfigError(
            f"the predictor's shape (num_moe_layers, hidden_size, num_experts) = "
            f"{(net.num_moe_layers, net.hidden_size, net.num_experts)} does not match the fingerprint's {dims}"
        )
    if horizon != net.horizon:
        raise ConfigError(f"horizon {horizon} does not match the predictor's ({net.horizon})")
    meta = {
        "format": PREDICTOR_FORMAT,
        "format_version": str(FORMAT_VERSION),
        **fingerprint.as_metadata(),
        **{k: str(v) for k, v in net.hyperparameters().items()},
    }
    for key, value in (extra_metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"extra metadata must map str to str, got {key!r}: {value!r}")
        if key in _RESERVED:
            raise ConfigError(f"extra metadata key {key!r} is reserved")
        meta[key] = value
    _write_safetensors(path, dict(net.state_dict()), meta)


def read_predictor_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a predictor file (ConfigError if it is not one)."""
    _, meta = _read_safetensors(path, "expert predictor")
    _check_format(meta, path, PREDICTOR_FORMAT, "expert predictor")
    return meta


def load_predictor(
    path: str | os.PathLike[str], expected: PredictorFingerprint, *, device: str | torch.device = "cpu"
) -> ExpertPredictorNet:
    """Load a predictor saved by `save_predictor` (safetensors only) for the model `expected` describes.

    ConfigError if the file is missing, not safetensors, not a predictor, corrupt, or was trained
    for a model whose fingerprint differs (the message names each differing field).
    """
    tensors, meta = _read_safetensors(path, "expert predictor")
    _check_format(meta, path, PREDICTOR_FORMAT, "expert predictor")
    found = PredictorFingerprint.from_metadata(meta)
    diffs = found.differences(expected)
    if diffs:
        listed = "; ".join(f"{name}: file {a!r}, model {b!r}" for name, a, b in diffs)
        raise ConfigError(f"expert predictor {str(path)!r} was trained for a different model ({listed}); {TRAIN_HINT}")
    try:
        hp = {k: int(meta[k]) for k in ("horizon", "dict_size", "code_k", "layer_dim", "head_dim")}
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"expert predictor {str(path)!r} has corrupt metadata ({exc!r})") from None
    net = ExpertPredictorNet(found.num_moe_layers, found.hidden_size, found.num_experts, **hp)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"expert predictor {str(path)!r} is corrupt: {exc}") from None
    net.fingerprint = found
    return net.eval().to(device)
