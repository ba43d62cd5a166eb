"""The `torus-sparse` console command: real subprocesses for what a user sees of the process (exit
status, stdout/stderr), and `main()` in this process for the many bad-input cases (the same code
path, without paying a Python + torch start per case)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
from transformers import GenerationConfig

from torus_adapters.apps.cli import build_parser, main
from torus_adapters.apps.sampling_args import FALLBACK, sampling_kwargs

EXE = shutil.which("torus-sparse") or ""


@pytest.fixture(autouse=True)
def _keep_progress_bars():
    """`main()` turns transformers' progress bars off for its spinner; give other tests theirs back."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    yield
    if bars:
        hf_logging.enable_progress_bar()


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "torus_adapters.apps.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_generate_streams_a_reply_from_the_default_model_and_prints_stats():
    out = run("generate", "What is the capital of France?", "--transport", "copy", "--resident-layers", "10",
              "--max-new-tokens", "24", "--temperature", "0")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    stats_line = next(line for line in out.stderr.splitlines() if line.startswith("stats:"))
    assert "transport=copy" in stats_line and "resident=10 streamed=20" in stats_line and "misses=0" in stats_line


def test_json_stats_are_machine_readable_and_int8_streams_fewer_bytes():
    out = run("generate", "What is the capital of France?", "--max-new-tokens", "8", "--json-stats", "--temperature",
              "0", "--transport", "copy", "--resident-layers", "0", "--weight-quant", "int8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["streamed_layers"] == 30 and stats["bytes_moved"] > 0 and stats["hit_rate"] == 1.0
    # int8 moves about a quarter of SmolLM2's fp32 FFN bytes (303.75 MiB per pass).
    assert 0 < stats["streamed_bytes_per_pass"] < 0.3 * 318504960


def test_a_hub_id_neither_cached_nor_reachable_is_one_line_and_exit_2():
    """The real process: no retries, no traceback, and the line says how to point at a local model."""
    out = run("generate", "--model", "HuggingFaceTB/SmolLM2-1.7B", "hi", HF_HUB_OFFLINE="1")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("torus-sparse: error:"), out.stderr
    assert "not in the Hugging Face cache" in out.stderr and "local model directory or a .gguf" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vram-budget", "6XB"], "accepted forms|use an integer number of bytes"),
        (["--model", "/nope/model"], "/nope/model"),
        (["--model", "not a hub id!"], "neither an existing path nor a valid Hugging Face Hub id"),
        (["--transport", "carrier-pigeon"], "available: copy, cuda, simulated-link, zero-copy"),
        (["--vram-budget", "1MB", "--transport", "copy"], "minimum is"),
        (["--vram-budget", "500MB"], "--vram-budget cannot apply with the zero-copy transport.*--transport copy"),
        (["--vram-budget", "1" + "0" * 400], "cannot read"),
        (["--vram-budget", "9" * 400 + "GB"], "cannot read"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message, capsys):
    assert main(["generate", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torus-sparse: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "0")])
def test_bad_sampling_flags_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "hi", flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_plugins_lists_builtins_and_version_prints(capsys):
    out = run("plugins")
    assert out.returncode == 0
    assert "llama" in out.stdout and "opt" in out.stdout and "zero-copy" in out.stdout and "sequential" in out.stdout
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"torus-sparse {version('torus-sparse')}"


def _sampling(argv: list[str], generation_config: GenerationConfig) -> dict:
    return sampling_kwargs(build_parser().parse_args(["generate", "hi", *argv]), generation_config)


def test_sampling_defaults_come_from_the_models_generation_config_else_the_fallback():
    # SmolLM2's generation_config sets no sampling values: the fallback applies.
    assert _sampling([], GenerationConfig()) == {"do_sample": True, **FALLBACK}
    own = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert _sampling([], own) == {"do_sample": True, "temperature": 0.3, "top_p": 0.8, "top_k": 20,
                                  "repetition_penalty": 1.05}  # fmt: skip
    assert _sampling(["--temperature", "1.2", "--top-k", "5"], own)["temperature"] == 1.2
    assert _sampling(["--top-k", "5"], own)["top_k"] == 5
    assert _sampling(["--temperature", "0"], own) == {"do_sample": False}
    assert _sampling(["--temperature", "0", "--repetition-penalty", "1.3"], own) == {
        "do_sample": False,
        "repetition_penalty": 1.3,
    }
    # A model that asks for greedy decoding gets it unless a sampling flag says otherwise.
    assert _sampling([], GenerationConfig(do_sample=False)) == {"do_sample": False}
    assert _sampling(["--top-p", "0.5"], GenerationConfig(do_sample=False))["do_sample"] is True


def test_a_seed_makes_a_sampled_reply_reproducible(streamed_smollm2):
    kw = _sampling(["--seed", "7"], streamed_smollm2.model.generation_config)
    replies = []
    for _ in range(2):
        torch.manual_seed(7)
        replies.append(streamed_smollm2.generate("Name a colour.", max_new_tokens=8, **kw))
    assert replies[0] == replies[1] and replies[0]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_of_every_subcommand_has_help(name):
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in _subcommands()[name]._actions
        if a.help is not argparse.SUPPRESS and not (a.help or "").strip()
    ]
    assert not missing, f"{name}: {missing}"


def test_vram_budget_is_the_flag_everywhere_and_vram_a_hidden_alias():
    subs = _subcommands()
    for name in ("generate", "chat", "serve", "transformers-serve", "plan", "bench"):
        assert "--vram-budget" in subs[name].format_help(), name
        assert "--vram " not in subs[name].format_help(), name
    parse = build_parser().parse_args
    assert parse(["plan", "--vram-budget", "6GB"]).vram_budget == parse(["plan", "--vram", "6GB"]).vram_budget == "6GB"
    assert parse(["bench", "--vram-budget", "6GB"]).vram == parse(["bench", "--vram", "6GB"]).vram == "6GB"


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(port, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--port", port])
    assert exit_.value.code == 2 and "must be a port number from 0 to 65535" in capsys.readouterr().err
