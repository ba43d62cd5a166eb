"""The `torus-sparse` console command, run as a user would: a real subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

EXE = shutil.which("torus-sparse") or ""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "torus_adapters.apps.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_generate_streams_a_reply_from_the_default_model_and_prints_stats():
    out = run(
        "generate",
        "What is the capital of France?",
        "--transport",
        "copy",
        "--resident-layers",
        "10",
        "--max-new-tokens",
        "24",
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    stats_line = next(line for line in out.stderr.splitlines() if line.startswith("stats:"))
    assert "transport=copy" in stats_line and "resident=10 streamed=20" in stats_line and "misses=0" in stats_line


def test_generate_json_stats_are_machine_readable():
    out = run(
        "generate", "Say hi.", "--max-new-tokens", "4", "--json-stats", "--transport", "copy", "--resident-layers", "0"
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["streamed_layers"] == 30 and stats["bytes_moved"] > 0 and stats["hit_rate"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vram-budget", "6XB"], "accepted forms|use an integer number of bytes"),
        (["--model", "/nope/model"], "/nope/model"),
        (["--transport", "carrier-pigeon"], "available: copy, cuda, simulated-link, zero-copy"),
        (["--vram-budget", "1MB", "--transport", "copy"], "minimum is"),
        (["--vram-budget", "1" + "0" * 400], "cannot read"),
        (["--vram-budget", "9" * 400 + "GB"], "cannot read"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message):
    out = run("generate", "hi", *args)
    assert out.returncode == 2
    assert out.stderr.startswith("torus-sparse: error:")
    assert re.search(message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr


def test_plugins_lists_builtins():
    out = run("plugins")
    assert out.returncode == 0
    assert "llama" in out.stdout and "opt" in out.stdout and "zero-copy" in out.stdout and "sequential" in out.stdout


def test_weight_quant_streams_fewer_bytes_from_the_command_line():
    out = run("generate", "What is the capital of France?", "--max-new-tokens", "8", "--json-stats",
              "--transport", "copy", "--resident-layers", "0", "--weight-quant", "int8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    # int8 moves about a quarter of SmolLM2's fp32 FFN bytes (303.75 MiB per pass).
    assert 0 < stats["streamed_bytes_per_pass"] < 0.3 * 318504960
