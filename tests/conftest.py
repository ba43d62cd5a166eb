"""Shared fixtures: tiny random-init models of each architecture, and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Callable

import pytest
import torch
import transformers as T

# One row per architecture in the matrix: (name, config class, kwargs). Every model is tiny
# (a few thousand parameters per layer) so the whole matrix runs in seconds.
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
TINY_CONFIGS: dict[str, Callable[[], T.PretrainedConfig]] = {
    "llama": lambda: T.LlamaConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(
        **_COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=16
    ),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "phi": lambda: T.PhiConfig(**_COMMON, intermediate_size=64),
    "phi3": lambda: T.Phi3Config(**_COMMON, intermediate_size=64, num_key_value_heads=2, pad_token_id=0),
    "starcoder2": lambda: T.Starcoder2Config(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "stablelm": lambda: T.StableLmConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "olmo2": lambda: T.Olmo2Config(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "granite": lambda: T.GraniteConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2),
    "gpt2": lambda: T.GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64),
    "gptj": lambda: T.GPTJConfig(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4),
    "gemma": lambda: T.GemmaConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "bloom": lambda: T.BloomConfig(vocab_size=96, hidden_size=32, n_layer=4, n_head=4),
    "falcon": lambda: T.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, intermediate_size=64),
    "opt": lambda: T.OPTConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
}


# MoE families as transformers 5 implements them (fused experts), 8 experts, top-2, eager experts
# so the unwrapped reference computes in the same order as the streamed experts.
_MOE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
TINY_MOE_CONFIGS: dict[str, Callable[[], T.PretrainedConfig]] = {
    "mixtral": lambda: T.MixtralConfig(**_MOE, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": lambda: T.OlmoeConfig(**_MOE, intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        **_MOE,
        intermediate_size=64,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        **_MOE, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2
    ),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        **{**_MOE, "num_key_value_heads": 4},  # multi-head latent attention: one KV head per head
        intermediate_size=64,
        moe_intermediate_size=48,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "gpt_oss": lambda: T.GptOssConfig(
        **_MOE, head_dim=8, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, sliding_window=16
    ),
}


def build_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init causal LM of the named family, deterministic for a given seed."""
    torch.manual_seed(seed)
    if name in TINY_MOE_CONFIGS:
        config = TINY_MOE_CONFIGS[name]()
        config._experts_implementation = "eager"
        model = T.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        if name == "deepseek_v3":
            # Random init leaves the routing-bias buffer at zero; make it matter.
            for layer in model.model.layers:
                bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(torch.rand(bias.shape) * 0.1)
        return model.eval()
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    return model.eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded default model's safetensors directory (converted from the GGUF once)."""
    from torus_adapters.transformers_adapter.default_model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: str):
    return T.AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def streamed_smollm2(smollm2_path: str):
    """One `TorusModel` of the embedded SmolLM2 streaming 20 of its 30 FFN layers through the copy
    ring, shared by every test that only generates with it (loaded once per session). Tests that
    attach, detach, quantize or count stats from zero load their own."""
    from torus_plugins import TorusConfig, TorusModel

    return TorusModel.from_pretrained(smollm2_path, TorusConfig(transport="copy", resident_layers=10))


def load_smollm2(path: str) -> torch.nn.Module:
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def wide_llama() -> torch.nn.Module:
    """A tiny Llama whose FFN is wide enough to split into several 16-neuron blocks."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return T.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------- host placement tests
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
NEW = 6


def greedy(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def decode_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of the first one-token pass after an 8-token prefill (the pass decode runs)."""
    out = model.generate(
        PROMPT,
        max_new_tokens=2,
        min_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.logits[1]
