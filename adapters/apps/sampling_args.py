"""The sampling options `generate` and `chat` share: flags, and the `generate()` keywords they mean.

Each option not given takes the model's own `generation_config` value, as chat front-ends do,
else the fallback below (a 135M model decoded greedily loops: "They are very intelligent." to the
token limit). `--temperature 0` decodes greedily.
"""

from __future__ import annotations

import argparse
from typing import Any

#: Used where neither the command line nor the model's generation_config sets a value.
FALLBACK = {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's generation_config, else the value shown)")
    g.add_argument(
        "--temperature",
        type=_non_negative_float,
        help=f"softmax temperature; 0 decodes greedily (else {FALLBACK['temperature']})",
    )
    g.add_argument("--top-p", type=_probability, help=f"nucleus sampling mass (else {FALLBACK['top_p']})")
    g.add_argument("--top-k", type=_positive_int, help=f"sample from the k likeliest tokens (else {FALLBACK['top_k']})")
    g.add_argument(
        "--repetition-penalty",
        type=_positive_float,
        help=f"divide repeated tokens' logits by this; 1 turns it off (else {FALLBACK['repetition_penalty']})",
    )
    g.add_argument("--seed", type=int, help="seed the sampler, for a reproducible reply (default: random)")


def sampling_kwargs(args: argparse.Namespace, generation_config: Any) -> dict[str, Any]:
    """The `generate()` keywords for the flags in `args` over the model's `generation_config`."""

    def pick(name: str) -> Any:
        given = getattr(args, name)
        if given is not None:
            return given
        own = getattr(generation_config, name, None)
        return own if own is not None else FALLBACK[name]

    greedy = args.temperature == 0 or (
        # The model asks for greedy decoding and no sampling flag overrides it.
        getattr(generation_config, "do_sample", None) is False
        and args.temperature is None
        and args.top_p is None
        and args.top_k is None
    )
    if greedy:
        kw: dict[str, Any] = {"do_sample": False}
        if args.repetition_penalty is not None:
            kw["repetition_penalty"] = args.repetition_penalty
        return kw
    return {"do_sample": True, **{name: pick(name) for name in FALLBACK}}
