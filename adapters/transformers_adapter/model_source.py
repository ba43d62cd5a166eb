"""Where a model comes from, and whether it can run, answered before anything heavy loads.

`resolve_model_source` turns the user's argument into what `from_pretrained` takes (the embedded
default, a `.gguf` file, a directory, a Hub id). `check_model` then refuses, with one sentence
that says what to do, what transformers would otherwise report as a long traceback or, worse,
load wrongly: a directory without weights, a config that is not a causal language model.
`load_tokenizer` does the same for a missing tokenizer (transformers' own error there ends in a
misleading "install sentencepiece" hint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torus_plugins import ModelNotFoundError, TorusError

from .default_model import DEFAULT_MODEL_NAME, default_model_path

#: Seconds the one Hub metadata request may take before the model counts as unreachable.
HUB_PROBE_TIMEOUT_S = 10.0
#: Weight files `from_pretrained` reads from a directory (transformers 5 dropped TF and Flax).
WEIGHT_GLOBS = ("*.safetensors", "*.bin")
#: Files a tokenizer is built from: fast (tokenizer.json), sentencepiece, BPE / WordPiece vocabularies.
TOKENIZER_GLOBS = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")
_TEXT_MODELS = "a text-generation (decoder) model such as Llama, Qwen, Mistral or GPT-2"


class NotACausalLMError(TorusError, ValueError):
    """The model is not a causal (text-generation) language model: nothing to stream a reply from."""


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or path.endswith((".gguf", ".safetensors", ".bin"))
        or os.sep != "/"
        and os.sep in path
    )


def model_name(path_or_id: str | os.PathLike[str] | None) -> str:
    """The model as messages name it: the user's argument as typed, else the embedded default."""
    return DEFAULT_MODEL_NAME if path_or_id is None else os.fspath(path_or_id)


def resolve_model_source(path_or_id: str | os.PathLike[str] | None) -> tuple[str, dict[str, Any]]:
    """Turn the user's model argument into (`from_pretrained` first argument, extra kwargs).

    None → the embedded default (converted once to safetensors); a `.gguf` file → its directory
    plus `gguf_file`; a directory with a config.json → itself; anything else that looks like a
    path → `ModelNotFoundError` naming it; otherwise a Hub id, checked by `check_hub_id`.
    """
    if path_or_id is None:
        return str(default_model_path()), {}
    text = os.fspath(path_or_id)
    p = Path(text).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), {}
        ggufs = sorted(g.name for g in p.glob("*.gguf"))
        if ggufs:
            raise ModelNotFoundError(
                f"model directory {text!r} has .gguf files but no config.json; pass the .gguf file itself, "
                f"e.g. --model {str(p / ggufs[0])!r}"
            )
        raise ModelNotFoundError(
            f"model directory {text!r} has no config.json, so it is not a transformers model directory; pass "
            f"the folder save_pretrained() wrote (config.json, weights, tokenizer), a .gguf file or a Hub id"
        )
    if p.exists():
        raise ModelNotFoundError(
            f"model path {text!r} is a file, not a model directory or a .gguf file; pass the folder that "
            f"holds its config.json"
        )
    if _looks_local(text):
        raise ModelNotFoundError(
            f"model path {text!r} does not exist; pass a model directory, a .gguf file or a Hub id (owner/name)"
        )
    check_hub_id(text)
    return text, {}


def check_hub_id(repo_id: str) -> None:
    """Refuse a Hub id that is neither in the local cache nor reachable, in one line and at once.

    Left to `from_pretrained`, an unreachable Hub costs a storm of retries (about 30 s) and a
    70-line traceback. One metadata request with a short timeout answers the same question.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: transformers loads it without the network
    except HFValidationError:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing path nor a valid Hugging Face Hub id (owner/name)"
        ) from None
    local = "pass a local model directory or a .gguf file instead (e.g. --model ./my-model or --model model.gguf)"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {local}, or "
            f"download it once with network access (hf download {repo_id})"
        )
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is gated on the Hub: accept its terms on huggingface.co and log in (hf auth login), or {local}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not on the Hugging Face Hub (or is private: log in with hf auth login); {local}"
        ) from None
    except Exception as exc:  # no network, DNS, proxy, timeout, 5xx: all mean "cannot reach it now"
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither in the Hugging Face cache nor reachable ({type(exc).__name__}: {exc}); "
            f"{local}, or download it once with network access (hf download {repo_id})"
        ) from None


def _local_dir(source: str, extra: dict[str, Any]) -> Path | None:
    """The directory whose files can be checked: a local model directory, not a Hub id or a GGUF."""
    p = Path(source)
    return p if "gguf_file" not in extra and p.is_dir() else None


def _has(d: Path, globs: tuple[str, ...]) -> bool:
    return any(next(d.glob(g), None) is not None for g in globs)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(source: str, extra: dict[str, Any], name: str, **hf_kwargs: Any) -> Any:
    """The model's transformers config, or one line saying why it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **extra, **hf_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot read the config of model {name!r}: {first_line(exc)}") from None


def check_causal_lm(cfg: Any, name: str) -> None:
    """Refuse a config that is not a causal language model, before any weights load.

    The rule, in transformers' own terms: (1) the config's class must be in the causal-LM mapping
    (else `AutoModelForCausalLM` itself fails, after a list of every class it knows), or name a
    remote `AutoModelForCausalLM` in its `auto_map`; (2) a config class that is also in the
    masked-LM mapping (BERT, RoBERTa, ELECTRA, BART, ...) must say it is a decoder
    (`is_decoder`, XLM's `causal`): otherwise the causal-LM class transformers has for it is the
    pretrained encoder under a language-model head it never trained, which generates noise.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = getattr(cfg, "model_type", None) or type(cfg).__name__
    remote = "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {})
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise NotACausalLMError(
            f"model {name!r} is a {kind} model, which transformers cannot load as a causal language model; "
            f"use {_TEXT_MODELS}"
        )
    decoder = getattr(cfg, "is_decoder", False) or getattr(cfg, "causal", False)
    if type(cfg) in MODEL_FOR_MASKED_LM_MAPPING and not decoder:
        raise NotACausalLMError(
            f"model {name!r} is an encoder ({kind}, a masked language model, not a decoder): generating "
            f"with it would use a language-model head it never trained; use {_TEXT_MODELS}"
        )


def check_model(source: str, extra: dict[str, Any], name: str, *, weights: bool = True, **hf_kwargs: Any) -> Any:
    """Check a resolved source before loading it: a local directory holds weights (when `weights`),
    and its config is a causal LM. Returns the config."""
    d = _local_dir(source, extra)
    if weights and d is not None and not _has(d, WEIGHT_GLOBS):
        raise ModelNotFoundError(
            f"model directory {name!r} has a config.json but no weights (*.safetensors or *.bin); copy the "
            f"weight files next to it, or pass the folder save_pretrained() wrote"
        )
    cfg = load_config(source, extra, name, **hf_kwargs)
    check_causal_lm(cfg, name)
    return cfg


def load_tokenizer(source: str, extra: dict[str, Any], name: str) -> Any:
    """The model's tokenizer, or one line: "has no tokenizer" when it fails in a local directory
    holding none of a tokenizer's files, else transformers' first line of why it failed.

    Load first, judge after: a tokenizer that needs no files (byte-level) must not be refused.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except Exception as exc:  # a tokenizer that cannot be built is bad input, whatever transformers raises
        d = _local_dir(source, extra)
        if d is not None and not _has(d, TOKENIZER_GLOBS):
            raise ModelNotFoundError(
                f"model directory {name!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab files); save "
                f"it there with tokenizer.save_pretrained(), or copy those files from where the model came from"
            ) from None
        raise ModelNotFoundError(f"cannot load the tokenizer of model {name!r}: {first_line(exc)}") from None


def open_model(path_or_id: str | os.PathLike[str] | None) -> Any:
    """Everything `TorusModel.from_pretrained` checks and loads short of the weights, in its order:
    resolve the source, check its files and config, load the tokenizer (returned)."""
    source, extra = resolve_model_source(path_or_id)
    name = model_name(path_or_id)
    check_model(source, extra, name)
    return load_tokenizer(source, extra, name)
