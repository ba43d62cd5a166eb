"""Built-in architecture plugin: where `transformers` decoder models keep their FFN weights.

One table row per model family: the fast path, and the override for a layout structural
discovery (`discovery`, asked after every row) would get wrong. A family not listed here is
found by discovery; a row of your own is one `DecoderFFN` (or any object following
`torus_plugins.architecture.Architecture`) registered from your plugin; see docs/plugins.md,
"Adding an architecture".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from torus_plugins.architecture import FFNSite
from torus_plugins.hookspecs import hookimpl


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class DecoderFFN:
    """A `transformers` family whose decoder layers each hold one FFN.

    name: shown in errors and stats.
    model_types: `config.model_type` values this row covers.
    layers: attribute paths (tried in order) from the model to its `ModuleList` of decoder layers.
    ffn: the submodule of a layer holding the FFN (all its parameters stream); `None` when the FFN
        linears sit directly on the layer, as in OPT.
    linears: with `ffn=None`, the FFN linears on the layer, first-executed first.
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...] = ("model.layers",)
    ffn: str | None = "mlp"
    linears: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        for path in self.layers:
            found = _get_path(model, path)
            if isinstance(found, nn.ModuleList):
                return found
        raise ValueError(f"{self.name}: none of {self.layers} is a ModuleList on {type(model).__name__}")

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        sites = []
        for i, layer in enumerate(self._layers(model)):
            modules = [getattr(layer, self.ffn)] if self.ffn else [getattr(layer, n) for n in self.linears]
            names = [self.ffn] if self.ffn else list(self.linears)
            params = []
            for prefix, mod in zip(names, modules):
                for sub_name, sub in mod.named_modules():
                    for attr, _ in sub.named_parameters(recurse=False):
                        qual = ".".join(x for x in (f"layers.{i}", prefix, sub_name, attr) if x)
                        params.append((qual, sub, attr))
            sites.append(FFNSite(entry=modules[0], exit=modules[-1], params=tuple(params)))
        return sites

    def prepare_model(self, model: nn.Module) -> Callable[[], None] | None:
        return disable_generate_compile(model)

    def kv_bytes_per_token(self, model: nn.Module) -> int:
        return kv_bytes_per_token(model)


def kv_bytes_per_token(model: nn.Module) -> int:
    """KV-cache bytes per token of a transformers decoder, from its (text) config; 0 when the
    config does not say (a per-layer heterogeneous config refuses global reads)."""
    try:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
        head_dim = getattr(cfg, "head_dim", None) or hidden // max(heads, 1)
    except Exception:  # transformers raises its own error types for ambiguous per-layer fields
        return 0
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * dtype_bytes


def disable_generate_compile(model: nn.Module) -> Callable[[], None] | None:
    """Switch off `generate()`'s automatic `torch.compile` (on CUDA with a static cache): a
    compiled forward would not run the engine's hooks the way eager does. Returns the undo."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not hasattr(gen, "disable_compile"):
        return None
    before = gen.disable_compile
    gen.disable_compile = True

    def undo() -> None:
        gen.disable_compile = before

    return undo


TRANSFORMERS_ARCHITECTURES: tuple[DecoderFFN, ...] = (
    DecoderFFN("llama", ("llama",)),
    DecoderFFN("mistral", ("mistral",)),
    DecoderFFN("qwen2", ("qwen2",)),
    DecoderFFN("qwen3", ("qwen3",)),
    DecoderFFN("gemma", ("gemma",)),
    DecoderFFN("gemma2", ("gemma2",)),
    DecoderFFN("gemma3", ("gemma3_text", "gemma3"), layers=("model.layers", "model.language_model.layers")),
    DecoderFFN("phi", ("phi",)),
    DecoderFFN("phi3", ("phi3",)),
    DecoderFFN("starcoder2", ("starcoder2",)),
    DecoderFFN("stablelm", ("stablelm",)),
    DecoderFFN("olmo2", ("olmo", "olmo2")),
    DecoderFFN("granite", ("granite",)),
    DecoderFFN("gpt2", ("gpt2",), layers=("transformer.h",)),
    DecoderFFN("gptj", ("gptj",), layers=("transformer.h",)),
    DecoderFFN("gpt_neox", ("gpt_neox",), layers=("gpt_neox.layers",)),
    DecoderFFN("bloom", ("bloom",), layers=("transformer.h",)),
    DecoderFFN("falcon", ("falcon",), layers=("transformer.h",)),
    DecoderFFN("opt", ("opt",), layers=("model.decoder.layers",), ffn=None, linears=("fc1", "fc2")),
)


@hookimpl
def torus_register_architectures(register) -> None:
    for arch in TRANSFORMERS_ARCHITECTURES:
        register(arch)
