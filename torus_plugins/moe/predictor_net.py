"""A learned MoE expert predictor: which experts the next MoE layers will route to.

From the router input (hidden state) at MoE layer j, `ExpertPredictorNet` scores the experts of
MoE layers j+1..j+horizon, so the engine can prefetch them before their router runs. The net is a
sparse autoencoder over hidden states (its sparse code is the feature) plus a small MLP head that
also sees a learned embedding of j. It is trained from `RoutingTraces` recorded on the real model
(`torus_adapters.tools.routing_traces.record_traces`; training lives in `moe.training`, so the runtime
never imports it) and stored as safetensors, never pickle.

This module imports torch only; `safetensors.torch` is imported inside the save/load functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

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
