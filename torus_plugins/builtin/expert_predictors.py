"""Built-in MoE expert predictors (selected with `TorusConfig.moe_predictor`).

- "speculative": the next layers' own routers applied to the current layer's input. The
  residual stream changes little from one layer to the next, so this needs no training.
- "learned": a sparse autoencoder over hidden states with a small MLP head, trained from
  recorded routing traces (`torus-sparse train-predictor`) and read from a safetensors file.
- "frequency": the experts routed most often so far at each layer (a prior with no model).
- "none": no prediction; routed experts not in the cache load on demand.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..moe.predict import ExpertPredictContext, top_experts_tensor

Prediction = Sequence[tuple[int, "Sequence[int] | torch.Tensor"]]


def _ahead(ctx: ExpertPredictContext, j: int, wrap: bool = False) -> list[int]:
    """The next `lookahead` MoE layers; with `wrap`, past the last layer come the next token's
    first layers (their copies then overlap the LM head, sampling and the first attention)."""
    n = ctx.num_layers
    if wrap:
        return [(j + d) % n for d in range(1, min(ctx.lookahead, n - 1) + 1)]
    return list(range(j + 1, min(j + 1 + ctx.lookahead, n)))


class SpeculativeRouting:
    def __init__(self, ctx: ExpertPredictContext) -> None:
        self.ctx = ctx
        # options["speculative_rescale"]=False applies the next router to the raw current input.
        self.rescale = bool(ctx.options.get("speculative_rescale", True))
        # options["speculative_wrap"]=False: no guess for the next token's first layers.
        self.wrap = bool(ctx.options.get("speculative_wrap", True))

    @torch.no_grad()
    def predict(self, j: int, hidden: torch.Tensor, routed: torch.Tensor) -> Prediction:
        k, scores = self.ctx.prefetch_k, self.ctx.router_scores
        source = j if self.rescale else None
        return [(nxt, top_experts_tensor(scores(nxt, hidden, source), k)) for nxt in _ahead(self.ctx, j, self.wrap)]


class FrequencyPrior:
    def __init__(self, ctx: ExpertPredictContext) -> None:
        self.ctx = ctx
        self.counts = [torch.zeros(n, dtype=torch.int64) for n in ctx.num_experts]

    def predict(self, j: int, hidden: torch.Tensor, routed: torch.Tensor) -> Prediction:
        self.counts[j] += torch.bincount(routed.reshape(-1).cpu(), minlength=self.ctx.num_experts[j])[
            : self.ctx.num_experts[j]
        ]
        k = self.ctx.prefetch_k
        # A stable sort keeps ties in expert order, so an untrained prior is deterministic.
        return [
            (nxt, torch.sort(self.counts[nxt], descending=True, stable=True).indices[:k].tolist())
            for nxt in _ahead(self.ctx, j, wrap=True)
        ]


class LearnedPredictor:
    def __init__(self, ctx: ExpertPredictContext) -> None:
        from ..moe.predictor_net import PredictorFingerprint, load_predictor

        if not ctx.predictor_path:
            raise ConfigError(
                "moe_predictor='learned' needs moe_predictor_path: train one for this model with "
                "`torus-sparse train-predictor --model ... --out predictor.safetensors`"
            )
        expected = PredictorFingerprint(
            model_type=str(ctx.model.get("model_type", "")),
            num_moe_layers=ctx.num_layers,
            num_experts=ctx.num_experts[0],
            hidden_size=int(ctx.model.get("hidden_size", 0)),
            top_k=ctx.top_k[0],
        )
        self.net = load_predictor(ctx.predictor_path, expected)
        self.ctx = ctx
        self.horizon = int(getattr(self.net, "horizon", 1))
        self._device: torch.device | None = None

    @torch.no_grad()
    def predict(self, j: int, hidden: torch.Tensor, routed: torch.Tensor) -> Prediction:
        if self._device != hidden.device:
            self.net.to(hidden.device)
            self._device = hidden.device
        scores = self.net.predict(j, hidden.float())  # [horizon, experts]
        k = self.ctx.prefetch_k
        out = []
        for nxt in _ahead(self.ctx, j):
            step = nxt - j - 1
            if step >= min(self.horizon, scores.shape[0]):
                break
            out.append((nxt, torch.topk(scores[step], min(k, scores.shape[-1])).indices))
        return out


def no_prediction(ctx: ExpertPredictContext) -> None:
    """ "none": the engine skips prediction entirely when a factory returns None."""
    return None


@hookimpl
def torus_register_expert_predictors(register) -> None:
    register("speculative", SpeculativeRouting)
    register("learned", LearnedPredictor)
    register("frequency", FrequencyPrior)
    register("none", no_prediction)
