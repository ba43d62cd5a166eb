"""Every CausalLM family of the installed `transformers`, built tiny, and whether it streams.

`families()` lists one entry per `AutoModelForCausalLM` class (model types that share a class,
such as `gpt2` and `gpt-sw3`, are one family). `build(family)` shrinks the class's own config
generically (hidden 64, 2 layers, vocab 128, 4 experts; 4 layers when 2 leave no attention
layer) and returns a random-init model, or raises `NotBuildable` with the reason.
`check(family)` attaches an engine the way the family matrix asks (copy transport, every layer
streamed, lookahead 2, MoE with half the experts cached) and compares logits and greedy tokens
with the plain model's, bit for bit, then detaches and checks the model is restored.

Used by `tests/test_family_matrix.py` and `benchmarks/family_matrix.py`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Config keys set (when the class has them) to make a model tiny.
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "ffn_hidden_size"), 128),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads"), 4),
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "moe_top_k"), 2),
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    # multi-head latent attention and group-limited routing (DeepSeek-style)
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_group": 2,
    "topk_group": 1,
    "rotary_dim": 8,
}
#: Families whose default config cannot run at all in this transformers (not a size problem):
#: DBRX's attention config lacks `rope_theta`, and `clip_qkv=None` fails in its `clamp`.
OVERRIDES: dict[str, dict[str, Any]] = {
    "DbrxForCausalLM": {
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    },
}
#: More than this many parameters after shrinking: not built (a config the shrinker misses).
MAX_PARAMS = 4_000_000
VOCAB = SIZES["vocab_size"]
PROMPT = torch.tensor([[5, 17, 42, 8, 63, 21]])
NEW_TOKENS = 4


class NotBuildable(Exception):
    """The family cannot be built small on a CPU by the generic shrinker; the message says why."""


@dataclass(frozen=True)
class Family:
    name: str  # the first model type mapped to the class
    model_types: tuple[str, ...]
    class_name: str


def families() -> list[Family]:
    """One entry per `AutoModelForCausalLM` class of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class: dict[str, list[str]] = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if isinstance(class_name, (tuple, list)):
            class_name = class_name[0]
        by_class.setdefault(class_name, []).append(model_type)
    return [Family(types[0], tuple(types), cls) for cls, types in by_class.items()]


def _shrunk_kwargs(config_cls: type, layers: int, tie_kv: bool) -> dict[str, Any]:
    base = config_cls()
    known = base.to_dict()
    sizes = {
        **SIZES,
        **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), layers),
    }
    kw: dict[str, Any] = {k: v for k, v in sizes.items() if k in known}
    if "qk_rope_head_dim" in kw and "head_dim" in kw:
        kw["head_dim"] = kw["qk_rope_head_dim"]  # latent attention: head_dim is the rotary part
    if tie_kv and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    if isinstance(known.get("layer_types"), list):
        kw["layer_types"] = known["layer_types"][:layers]
    # Special token ids past the small vocabulary would index outside the embedding.
    top = VOCAB - 1
    for key, value in known.items():
        if key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= VOCAB:
            kw[key], top = top, top - 1
        elif key == "eos_token_id" and isinstance(value, list):
            kw[key] = [v if v < VOCAB else VOCAB - 1 for v in value]
    for name in getattr(config_cls, "sub_configs", {}) or {}:
        sub = getattr(base, name, None)
        if sub is not None and hasattr(sub, "to_dict") and type(sub) is not config_cls:
            kw[name] = type(sub)(**_shrunk_kwargs(type(sub), layers, tie_kv)).to_dict()
    return kw


def _attempt(model_cls: type, layers: int, tie_kv: bool) -> nn.Module:
    config_cls = model_cls.config_class
    kwargs = {**_shrunk_kwargs(config_cls, layers, tie_kv), **OVERRIDES.get(model_cls.__name__, {})}
    config = config_cls(**kwargs)
    config._experts_implementation = "eager"  # the reference computes in the streamed experts' order
    for sub in (getattr(config, n, None) for n in getattr(config_cls, "sub_configs", {}) or {}):
        if sub is not None and hasattr(sub, "to_dict"):
            sub._experts_implementation = "eager"
    with torch.device("meta"):
        n = sum(p.numel() for p in model_cls(copy.deepcopy(config)).parameters())
    if n > MAX_PARAMS:
        raise NotBuildable(f"still {n:,} parameters after shrinking (the generic shrinker misses its size keys)")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        model(PROMPT)  # a model that cannot run a plain forward is not a test of streaming
    return model


def build(family: Family) -> nn.Module:
    """A tiny random-init model of the family (deterministic), or `NotBuildable`."""
    import transformers

    model_cls = getattr(transformers, family.class_name, None)
    if model_cls is None:
        raise NotBuildable(f"transformers has no {family.class_name} (needs an optional dependency)")
    errors = []
    for layers, tie_kv in ((2, False), (4, False), (4, True)):
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                return _attempt(model_cls, layers, tie_kv)
        except NotBuildable:
            raise
        except Exception as exc:  # the shrunk config is invalid for this family: try the next
            errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}")
    raise NotBuildable(f"no shrunk config builds and runs a plain forward ({errors[-1]})")


class _quiet:
    """Silence transformers' per-model warnings while building hundreds of models."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)


@dataclass
class Outcome:
    """What one family did. status: "identical" (streams with equal logits and tokens),
    "refused" (attach raised a clear error), "different" (streamed output differs: a bug),
    "error" (attach raised something other than a torus-sparse error: a bug), "not-built" (the
    shrinker could not build it)."""

    family: str
    class_name: str
    status: str
    architecture: str | None = None
    detail: str = ""
    streamed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "class": self.class_name,
            "status": self.status,
            "architecture": self.architecture,
            "detail": self.detail,
            "streamed": self.streamed,
        }


def _run(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    return logits, tokens


def matrix_config(model: nn.Module) -> Any:
    """The matrix's settings: copy transport, every FFN layer streamed, lookahead 2, and for MoE
    a shared expert cache holding half of all experts."""
    import torus_plugins as tp
    from torus_plugins.plugins import resolve

    arch = next((a for a in resolve().architectures if a.matches(model)), None)
    cache = None
    if arch is not None and hasattr(arch, "expert_sites"):
        sites = arch.expert_sites(model)
        if sites:
            cache = max(1, sum(s.num_experts for s in sites) // 2)
    return tp.TorusConfig(transport="copy", device="cpu", resident_layers=0, lookahead=2, moe_cache_experts=cache)


def check(family: Family, model: nn.Module | None = None) -> Outcome:
    """Build (unless given), attach, compare with the plain model, detach; never raises for a
    family's own failure (the outcome says what happened)."""
    import torus_plugins as tp

    try:
        model = model if model is not None else build(family)
    except NotBuildable as exc:
        return Outcome(family.name, family.class_name, "not-built", detail=str(exc))
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        ref_logits, ref_tokens = _run(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            engine = tp.attach(model, matrix_config(model))
        except tp.TorusError as exc:
            return Outcome(family.name, family.class_name, "refused", detail=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # not a clear refusal: a bug in discovery or the engine
            return Outcome(family.name, family.class_name, "error", detail=f"attach raised {type(exc).__name__}: {exc}")
        arch = engine.arch.name
        try:
            logits, tokens = _run(model)
            stats = engine.stats()
        except Exception as exc:
            tp.detach(model)
            return Outcome(family.name, family.class_name, "different", arch, f"streamed run raised {exc!r}")
        tp.detach(model)
    streamed = {"ffn_layers": stats.streamed_layers, "ffn_sites": len(engine.sites)}
    if stats.experts is not None:
        streamed["moe_layers"] = len(engine.expert_sites)
        streamed["experts_cached"] = int(engine.expert_plan.slots)
        streamed["experts_total"] = sum(s.num_experts for s in engine.expert_sites)
    problems = []
    if not torch.equal(logits, ref_logits):
        problems.append(f"logits differ by up to {(logits - ref_logits).abs().max().item():.3g}")
    if not torch.equal(tokens, ref_tokens):
        problems.append("greedy tokens differ")
    if stats.streamed_layers != len(engine.sites):
        problems.append(f"{stats.streamed_layers} of {len(engine.sites)} FFN layers streamed")
    after = model.state_dict()
    if before.keys() != after.keys() or not all(torch.equal(before[k], after[k]) for k in before):
        problems.append("detach did not restore every tensor")
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        problems.append("detach left hooks behind")
    if problems:
        return Outcome(family.name, family.class_name, "different", arch, "; ".join(problems), streamed)
    return Outcome(family.name, family.class_name, "identical", arch, "", streamed)
