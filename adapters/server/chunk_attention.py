"""Attention for a prompt's later prefill chunks without copying the cache per layer.

A chunk after the first attends to the whole cache through a mask (SDPA's `is_causal` aligns
top-left, so a chunk needs one). With a mask, transformers' SDPA path repeats the grouped key and
value heads (`repeat_kv`) of the whole cache in every layer: at 8,000 tokens on 2 CPU cores that
copy took about 300 ms of a 16-token chunk (two thirds of it, a cost that grows with the prompt,
not the chunk), so chunks sized to a time budget shrank to nothing. PyTorch's CPU flash kernel
takes a mask and grouped heads together (`enable_gqa`), with the same numbers bit for bit.

`chunk_attention(model)` switches the model's SDPA attention to that kernel for the passes run
inside it (the scheduler's prefill chunks); every other case (a GPU, no mask, one query, position
bias, soft-capping) goes through transformers' own function.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

#: The name the function is registered under (transformers' attention and mask registries).
NAME = "torus_chunk_sdpa"


def chunk_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with grouped heads left to the kernel on CPU when masked."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if grouped and plain and attention_mask is not None and query.shape[2] > 1 and query.device.type == "cpu":
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


AttentionInterface.register(NAME, chunk_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def sdpa_configs(model: Any) -> list[Any]:
    """The configs, of `model` and its parts, whose attention is transformers' SDPA."""
    seen: dict[int, Any] = {}
    for part in model.modules():
        config = getattr(part, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            seen[id(config)] = config
    return list(seen.values())


@contextlib.contextmanager
def chunk_attention(configs: list[Any]) -> Iterator[None]:
    """Run the passes inside with `chunk_sdpa` in place of SDPA for `configs` (from `sdpa_configs`)."""
    for config in configs:  # the dict form leaves sub-configs as they are
        config._attn_implementation = {"": NAME}
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = {"": "sdpa"}
