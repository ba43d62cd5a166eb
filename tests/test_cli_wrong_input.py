"""Every wrong input to the model-running commands is one line on stderr and exit status 2.

The real `torus-sparse` process for each case (what a user sees: the exit status, the whole of
stderr), on tiny random-init directories built here; nothing is downloaded (HF_HUB_OFFLINE=1).
The causal-LM rule itself is checked in process, against the architecture matrix the rest of
the suite streams and against every encoder transformers can put a causal head on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as T
from conftest import TINY_CONFIGS, TINY_MOE_CONFIGS

from torus_adapters.transformers_adapter.model_source import NotACausalLMError, check_causal_lm

EXE = shutil.which("torus-sparse") or ""
TEXT_MODELS = "use a text-generation (decoder) model such as Llama, Qwen, Mistral or GPT-2"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "torus_adapters.apps.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def assert_one_line(out: subprocess.CompletedProcess[str], message: str) -> None:
    assert (out.returncode, out.stderr) == (2, f"torus-sparse: error: {message}\n")


def _byte_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level tokenizer built here (no download), with no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _llama() -> T.PreTrainedModel:
    config = T.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """One directory per kind of wrong model (and one right one, for --raw)."""
    root = tmp_path_factory.mktemp("models")
    made = {name: root / name for name in ("empty", "config_only", "no_tokenizer", "no_template", "distilbert", "bert")}
    for d in made.values():
        d.mkdir()
    llama = _llama()
    llama.config.save_pretrained(made["config_only"])
    llama.save_pretrained(made["no_tokenizer"])
    llama.save_pretrained(made["no_template"])
    _byte_tokenizer().save_pretrained(made["no_template"])
    small = dict(vocab_size=96, num_attention_heads=4)
    T.DistilBertForMaskedLM(T.DistilBertConfig(**small, dim=32, n_layers=1, hidden_dim=64)).save_pretrained(
        made["distilbert"]
    )
    T.BertForMaskedLM(T.BertConfig(**small, hidden_size=32, num_hidden_layers=1, intermediate_size=64)).save_pretrained(
        made["bert"]
    )
    return {name: str(d) for name, d in made.items()}


def not_a_model_dir(d: str) -> str:
    return (
        f"model directory '{d}' has no config.json, so it is not a transformers model directory; pass the folder "
        f"save_pretrained() wrote (config.json, weights, tokenizer), a .gguf file or a Hub id"
    )


def no_weights(d: str) -> str:
    return (
        f"model directory '{d}' has a config.json but no weights (*.safetensors or *.bin); copy the weight files "
        f"next to it, or pass the folder save_pretrained() wrote"
    )


def no_tokenizer(d: str) -> str:
    return (
        f"model directory '{d}' has no tokenizer (tokenizer.json, tokenizer.model or vocab files); save it there "
        f"with tokenizer.save_pretrained(), or copy those files from where the model came from"
    )


def not_causal(d: str) -> str:
    return (
        f"model '{d}' is a distilbert model, which transformers cannot load as a causal language model; {TEXT_MODELS}"
    )


def encoder(d: str) -> str:
    return (
        f"model '{d}' is an encoder (bert, a masked language model, not a decoder): generating with it would use a "
        f"language-model head it never trained; {TEXT_MODELS}"
    )


# Each command that loads weights (plan reads only the config: a config-only directory is a plan's input).
GENERATE = ("generate", "hi")
CHAT = ("chat",)
SERVE = ("serve", "--port", "0")
BENCH = ("bench", "--tokens", "2", "--repeats", "1")
PLAN = ("plan", "--device", "cpu", "--bandwidth", "8GB/s", "--no-host-probe")


@pytest.mark.parametrize(
    "command, model, message",
    [
        pytest.param(cmd, "empty", not_a_model_dir, id=f"not-a-model-dir-{cmd[0]}")
        for cmd in (GENERATE, CHAT, SERVE, BENCH, PLAN)
    ]
    + [
        pytest.param(GENERATE, "config_only", no_weights, id="no-weights-generate"),
        pytest.param(SERVE, "config_only", no_weights, id="no-weights-serve"),
        pytest.param(GENERATE, "no_tokenizer", no_tokenizer, id="no-tokenizer-generate"),
        pytest.param(BENCH, "no_tokenizer", no_tokenizer, id="no-tokenizer-bench"),
        pytest.param(GENERATE, "distilbert", not_causal, id="distilbert-generate"),
        pytest.param(PLAN, "distilbert", not_causal, id="distilbert-plan"),
        pytest.param((*GENERATE, "--raw"), "bert", encoder, id="bert-generate-raw"),
        pytest.param(CHAT, "bert", encoder, id="bert-chat"),
        pytest.param(PLAN, "bert", encoder, id="bert-plan"),
    ],
)
def test_a_wrong_model_is_one_line_and_exit_2(dirs, command, model, message):
    assert_one_line(run(*command, "--model", dirs[model]), message(dirs[model]))


def test_no_chat_template_says_to_pass_raw_and_raw_runs(dirs):
    d = dirs["no_template"]
    assert_one_line(
        run(*GENERATE, "--model", d), f"model '{d}' has no chat template; pass --raw to send the prompt as plain text"
    )
    assert_one_line(
        run(*CHAT, "--model", d),
        f"model '{d}' has no chat template; chat sends conversations through it: use `torus-sparse generate --raw` "
        f"to continue plain text",
    )
    raw = run(*GENERATE, "--model", d, "--raw", "--max-new-tokens", "2", "--temperature", "0")
    assert raw.returncode == 0, raw.stderr  # the same directory is a working causal LM


def test_a_taken_port_is_refused_before_the_model_loads(dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model would fail too (no weights): the port's line proves the port was checked first.
        out = run("serve", "--port", str(port), "--model", dirs["config_only"])
    assert_one_line(
        out, f"port {port} on 127.0.0.1 is already in use; stop what listens there or pick another port with --port"
    )


def test_a_hub_id_not_cached_offline_is_one_line_for_plan_and_bench():
    for command in (PLAN, BENCH):
        out = run(*command, "--model", "no-such-owner/no-such-model")
        assert_one_line(
            out,
            "model 'no-such-owner/no-such-model' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; pass a "
            "local model directory or a .gguf file instead (e.g. --model ./my-model or --model model.gguf), or "
            "download it once with network access (hf download no-such-owner/no-such-model)",
        )


# ---------------------------------------------------------------------- the causal-LM rule
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS) + sorted(TINY_MOE_CONFIGS))
def test_every_family_the_suite_streams_is_a_causal_lm(family):
    check_causal_lm({**TINY_CONFIGS, **TINY_MOE_CONFIGS}[family](), family)


def test_encoders_are_refused_unless_their_config_says_decoder():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # Every model type transformers has both a masked-LM and a causal-LM class for: as pretrained
    # (not a decoder) each is refused; saved by its causal-LM class (is_decoder=True) it loads.
    both = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))
    assert {"bert", "roberta", "xlm-roberta", "electra", "bart"} <= set(both)
    for model_type in both:
        with pytest.raises(NotACausalLMError, match="is an encoder"):
            check_causal_lm(CONFIG_MAPPING[model_type](), model_type)
    check_causal_lm(T.BertConfig(is_decoder=True), "bert-decoder")
    check_causal_lm(T.XLMConfig(causal=True), "xlm-clm")
    with pytest.raises(NotACausalLMError, match="cannot load as a causal language model"):
        check_causal_lm(T.T5Config(), "t5")


def test_a_file_or_a_folder_of_ggufs_is_not_taken_for_a_model_directory(tmp_path: Path):
    from torus_adapters.transformers_adapter.model_source import resolve_model_source
    from torus_plugins import ModelNotFoundError

    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory or a .gguf file"):
        resolve_model_source(tmp_path / "notes.txt")
    (tmp_path / "m.Q4.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="pass the .gguf file itself, e.g. --model .*m.Q4.gguf"):
        resolve_model_source(tmp_path)
