"""The expert prediction seam: which experts the next MoE layers will route to.

A predictor is asked when an MoE layer starts, with that layer's input hidden states and its
routed experts, and answers with experts to prefetch for the layers after it. The engine issues
those copies behind the current layer's own loads, so they overlap its compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class ExpertPredictContext:
    """What a predictor knows when it is built for one attached model.

    num_layers: MoE layers (indices below are positions among MoE layers, 0-based).
    num_experts / top_k: per MoE layer.
    prefetch_k: experts to name per predicted layer (`moe_expert_prefetch_k`).
    lookahead: how many MoE layers ahead to predict (`TorusConfig.lookahead`).
    router_scores(j, hidden, source=None): `[tokens, experts]` scores of MoE layer j's router on
        `hidden`; pass `source` when `hidden` is MoE layer `source`'s input, to re-weight it by
        the two layers' norm scales first.
    predictor_path: `moe_predictor_path`, for predictors read from a file.
    model: identity of the model (model_type, hidden_size, ...) to check a predictor file against.
    options: `TorusConfig.options`.
    """

    num_layers: int
    num_experts: tuple[int, ...]
    top_k: tuple[int, ...]
    prefetch_k: int
    lookahead: int
    router_scores: Callable[..., torch.Tensor]
    predictor_path: str | None
    model: dict[str, Any]
    options: dict[str, Any]


class ExpertPredictor(Protocol):
    """Guesses upcoming experts. Called once per MoE layer per forward pass: keep it cheap.

    predict(j, hidden, routed): `hidden` is MoE layer j's input `[tokens, hidden_size]`,
    `routed` its `[tokens, top_k]` routed expert ids. Returns `(layer, experts)` pairs for
    layers after j, nearest first (past the last layer: the next token's first layers), each with at
    most `prefetch_k` expert ids, most likely first. The ids may be a sequence of ints or a 1-D
    integer tensor on any device: the engine reads every tensor of one call together with the
    routed ids in a single device-to-host transfer (a list costs the predictor its own host sync).
    """

    def predict(self, j: int, hidden: torch.Tensor, routed: torch.Tensor) -> Sequence[tuple[int, Sequence[int]]]: ...


#: Returns the predictor, or None for "predict nothing" (routed experts then load on demand).
ExpertPredictorFactory = Callable[[ExpertPredictContext], "ExpertPredictor | None"]


def top_experts(scores: torch.Tensor, k: int) -> list[int]:
    """The k best experts for a batch of tokens: for one token its top-k scores; for several,
    the experts most likely for any token (per-token softmax, then the maximum over tokens)."""
    return top_experts_tensor(scores, k).tolist()


def top_experts_tensor(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`top_experts` left on the scores' device (no host sync: the engine reads it with the routed ids)."""
    if scores.shape[0] == 1:
        row = scores[0]
    else:
        row = scores.float().softmax(dim=-1).amax(dim=0)
    k = min(k, row.shape[-1])
    return torch.topk(row, k).indices
