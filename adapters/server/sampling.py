"""Choosing the next token of each sequence in a batch: greedy, or sampled with its own settings.

Every sequence carries its own `SamplingParams` and its own `torch.Generator`, so a seeded request
draws the same tokens whether it runs alone or shares a batch. A row may carry a grammar
(`constraints.Constraint`): its logits are masked to the tokens the grammar allows before the
choice, and the chosen token advances the grammar; rows without one are untouched, so constrained
and free requests share a batch.

The reported log-probabilities are those of the distribution the token was drawn from, as OpenAI
defines them: `log_softmax` of the logits after `logit_bias`, penalties, the grammar's mask and the
temperature (greedy rows: temperature 1). top_k / top_p truncation is not applied to them (it would
make every cut token -inf).
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .constraints import Constraint, ConstraintViolated, grammar_masks

# Below this, dividing logits by the temperature could overflow; it is greedy in all but name.
_MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 means greedy (top_p / top_k / seed then unused).

    repetition_penalty: HF-style, over prompt and output (> 1 discourages repeats; 1 is off).
    frequency_penalty / presence_penalty: OpenAI-style, over the output so far (0 is off).
    logit_bias: OpenAI-style (token id, bias) pairs added to the raw logits, before penalties and
    temperature: -100 bans a token, +100 all but forces it (greedy requests included).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def adjusted(self) -> bool:
        """Whether anything changes the logits before the choice (penalties or a bias)."""
        return self.penalised or bool(self.logit_bias)


class Choice(NamedTuple):
    """One row's next token, its log-probability and, when asked for, the most likely alternatives."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RowSampler:
    """One sequence's sampling state: its parameters, its generator, the token counts penalties need,
    its grammar (if any) and how many alternatives to report (`top_logprobs`)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        device: torch.device,
        constraint: Constraint | None = None,
        top_logprobs: int = 0,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.top_logprobs = top_logprobs
        self.failure: str | None = None  # why this row's grammar cannot go on (the request then ends)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        self._seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        self._output: Counter[int] = Counter()
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self._bias = (torch.tensor(ids, device=device), torch.tensor(values, dtype=torch.float32, device=device))

    def record(self, token_id: int) -> None:
        if self.params.penalised:
            self._output[token_id] += 1
            if self.params.repetition_penalty != 1.0:
                self._seen.add(token_id)

    @property
    def plain(self) -> bool:
        """Greedy on the raw logits: the batch's argmax and log-softmax serve this row as they are."""
        return self.params.greedy and not self.params.adjusted and self.constraint is None

    @property
    def temperature(self) -> float:
        """What this row's logits are divided by (1 for greedy rows)."""
        return 1.0 if self.params.greedy else max(self.params.temperature, _MIN_TEMPERATURE)

    def penalise(self, x: torch.Tensor) -> None:
        """Apply `logit_bias` and the penalties to one row of logits (1-D, float32), in place."""
        p = self.params
        if self._bias is not None:
            x[self._bias[0]] += self._bias[1]
        if p.repetition_penalty != 1.0 and self._seen:
            idx = torch.tensor(sorted(self._seen), device=x.device)
            vals = x[idx]
            x[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if self._output and (p.frequency_penalty or p.presence_penalty):
            idx = torch.tensor(list(self._output), device=x.device)
            counts = torch.tensor(list(self._output.values()), dtype=x.dtype, device=x.device)
            x[idx] -= p.frequency_penalty * counts + p.presence_penalty

    def pick(self, x: torch.Tensor) -> int:
        """Draw a token from one row of adjusted logits (`adjusted`'s output) of a sampled row."""
        p = self.params
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        total = float(probs.sum())
        if not math.isfinite(total) or total <= 0.0:  # degenerate settings: fall back to the best token
            return int(torch.argmax(x))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def adjusted(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """`logits` ([len(rows), vocab], float32) as each row's choice sees them, a new tensor: bias and
    penalties (per row, where set), the grammar masks (all constrained rows at once), the
    temperature. A row whose grammar cannot go on gets its `failure` and no mask."""
    x = logits.clone()
    for i, row in enumerate(rows):
        if row.params.adjusted:
            row.penalise(x[i])
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    if constrained:
        allowed, errors = grammar_masks([rows[i].constraint for i in constrained], x.shape[1])  # type: ignore[misc]
        for i, error in zip(constrained, errors):
            if error is not None:
                rows[i].failure = error
        if len(constrained) == len(rows):
            x.masked_fill_(~allowed.to(x.device), float("-inf"))
        else:
            index = torch.tensor(constrained, device=x.device)
            x[index] = x[index].masked_fill(~allowed.to(x.device), float("-inf"))
    temperatures = [row.temperature for row in rows]
    if any(t != 1.0 for t in temperatures):
        x = x / torch.tensor(temperatures, dtype=x.dtype, device=x.device)[:, None]
    return x


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[Choice]:
    """Next token of every row of `logits` ([batch, vocab]), with its log-probability (and the
    row's `top_logprobs` alternatives); each row's grammar consumes its token."""
    logits = logits.float()
    dists = torch.log_softmax(logits, dim=-1)
    ids = torch.argmax(logits, dim=-1).tolist()  # host sync: one for the whole batch
    own = [i for i, row in enumerate(rows) if not row.plain]  # rows whose distribution is not the raw one
    own_dists: dict[int, torch.Tensor] = {}  # ... their log-softmax, for the rows that ask for alternatives
    if own:
        x = adjusted(logits[own], [rows[i] for i in own])
        best = torch.argmax(x, dim=-1).tolist()  # host sync: one for the adjusted rows
        for j, i in enumerate(own):
            ids[i] = best[j] if rows[i].params.greedy else rows[i].pick(x[j])  # host sync per sampled row
            if rows[i].top_logprobs:
                own_dists[i] = torch.log_softmax(x[j], dim=-1)
        if own_dists:
            dists = torch.stack([own_dists.get(i, dists[i]) for i in range(len(rows))])
    chosen = dists.gather(1, torch.tensor(ids, device=dists.device)[:, None]).squeeze(1)
    rest = [j for j, i in enumerate(own) if i not in own_dists]
    if rest:  # log_softmax(x)[id] for the other adjusted rows, without writing vocabulary-sized rows
        x, picked = x[rest], torch.tensor([ids[own[j]] for j in rest], device=dists.device)[:, None]
        values = x.gather(1, picked).squeeze(1) - torch.logsumexp(x, dim=-1)
        chosen = chosen.index_put((torch.tensor([own[j] for j in rest], device=dists.device),), values)
    chosen_values = chosen.tolist()  # host sync
    out: list[Choice] = []
    for i, row in enumerate(rows):
        top: tuple[tuple[int, float], ...] = ()
        if row.top_logprobs:
            values, indices = torch.topk(dists[i], row.top_logprobs)
            top = tuple(zip(indices.tolist(), values.tolist()))
        out.append(Choice(ids[i], chosen_values[i], top))
        row.record(ids[i])
        if row.constraint is not None and row.failure is None:
            try:
                row.constraint.consume(ids[i])
            except ConstraintViolated as exc:
                row.failure = str(exc)
    return out
