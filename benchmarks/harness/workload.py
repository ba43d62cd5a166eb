"""The CPU benchmarks' workload: the embedded model in ordinary memory, and the chat prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The decode benchmarks' prompt (cpu_decode.py, overlap.py): one fixed system + user turn.
SKY_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain in a few sentences why the sky is blue, then give one everyday example."},
]


def load_in_memory(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """`AutoModelForCausalLM` in eval mode, no grad, every parameter and buffer copied out of the
    safetensors memory map into ordinary memory (transformers maps the file; the engine's packed
    store is ordinary memory), so every variant reads weights from the same kind of memory.
    `named_parameters()` yields tied weights once, so tying survives."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    for _, p in model.named_parameters():
        p.data = p.data.clone()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.clone()
    return model


def chat_prompt(
    path: Path, messages: list[dict[str, str]] = SKY_MESSAGES
) -> tuple[dict[str, torch.Tensor], int | None]:
    """(`input_ids` + `attention_mask` of `messages` through the tokenizer's chat template, the pad id
    for `generate()`: the tokenizer's pad token, else its EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {k: enc[k] for k in ("input_ids", "attention_mask")}, pad_id
