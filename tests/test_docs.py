"""The README and every page under docs/ say what is true: every Python example runs as written,
the curl lines get their answers, every console command is real, and the pages build strictly."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers as T
from server_fixtures import server  # noqa: F401  (fixture)

import torus_plugins as tp
from torus_plugins.plugins import build_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _fenced(lang: str) -> list[tuple[str, str]]:
    """(page, block) for every ```lang block; a block shown on two pages is kept once (it would
    only run twice)."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for block in re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S):
            block = _dedent(block)
            seen.setdefault(block, page.relative_to(ROOT).as_posix())
    return [(page, block) for block, page in seen.items()]


def _dedent(block: str) -> str:
    """A fence inside a list item is indented; its code is not."""
    lines = block.splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines) + "\n"


BLOCKS = _fenced("python")
PLUGIN_BLOCKS = [b for _, b in BLOCKS if "@hookimpl" in b]
SCRIPT_BLOCKS = [(page, b) for page, b in BLOCKS if "@hookimpl" not in b]
SHELL = _fenced("bash")
SERVER_ADDRESS = "http://127.0.0.1:8000"


def test_the_pages_hold_the_examples():
    """The pages are read at all: a renamed folder or fence must not turn this file into a no-op."""
    assert (ROOT / "docs" / "index.md").exists()
    assert len(SCRIPT_BLOCKS) >= 8 and len(PLUGIN_BLOCKS) == 1, [page for page, _ in BLOCKS]
    assert len(ROOT.joinpath("README.md").read_text().splitlines()) <= 200, "the README is a door, not a guide"


def _console_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) for every `torus-sparse ...` line of a bash block, comments dropped."""
    commands = []
    for page, block in SHELL:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            at = [i for i, w in enumerate(words) if w == "torus-sparse" or w.endswith("/torus-sparse")]
            if at:
                commands.append((page, words[at[0] + 1 :]))
    return commands


def test_every_console_command_is_a_real_subcommand():
    """The bash examples name subcommands and options the CLI really has: each line parses."""
    from torus_adapters.apps.cli import build_parser

    commands = _console_commands()
    assert {argv[0] for _, argv in commands if argv} >= {"generate", "serve", "plan"}, "no console command shown"
    for page, argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{page}: `torus-sparse {' '.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize(
    "index", range(len(SCRIPT_BLOCKS)), ids=[f"{page}-{i}" for i, (page, _) in enumerate(SCRIPT_BLOCKS)]
)
def test_script_example_runs(index, request):
    code = SCRIPT_BLOCKS[index][1]
    if SERVER_ADDRESS in code:
        # The example talks to `torus-sparse serve --port 8000`: run it against a real server of
        # ours on a free port instead of assuming 8000 is free here.
        code = (
            code.replace(SERVER_ADDRESS, request.getfixturevalue("server"))
            + "\nprint(reply.choices[0].message.content)"
        )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
    if "stats()" in SCRIPT_BLOCKS[index][1]:
        assert "hits=" in out.stdout  # the examples that print the engine's stats really show them


def _curl_lines() -> list[str]:
    commands = []
    for _, block in SHELL:
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.startswith("curl ") and SERVER_ADDRESS in command:
                commands.append(command)
    return commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lines_get_their_answers(server):  # noqa: F811  (fixture)
    commands = _curl_lines()
    assert any("/health" in c for c in commands) and any('"stream": true' in c for c in commands), commands
    for command in commands:
        out = subprocess.run(
            ["bash", "-c", command.replace(SERVER_ADDRESS, server)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, (command, out.stderr[-2000:])
        if "/health" in command:
            assert '"status":"ok"' in out.stdout.replace(" ", "")
        if '"stream": true' in command:
            events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
            assert len(events) > 2 and events[-1] == "data: [DONE]", out.stdout[-2000:]


def test_docs_build_strictly(tmp_path):
    """mkdocs --strict fails on a link to a missing page or heading, or to a file outside docs/."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_architecture_plugin_example_streams_a_new_family():
    module = types.ModuleType("docs_cohere_plugin")
    exec(PLUGIN_BLOCKS[0], module.__dict__)
    pm = build_plugin_manager(autoload=False)
    torch.manual_seed(0)
    cfg = T.CohereConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ref = model(ids).logits
    # Without the row, structural discovery streams it; the registered row is asked first.
    assert tp.attach(model, tp.TorusConfig(transport="copy"), plugin_manager=pm).arch.name == "discovered"
    tp.detach(model)
    pm.register(module)
    engine = tp.attach(model, tp.TorusConfig(transport="copy", resident_layers=0), plugin_manager=pm)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert engine.arch.name == "cohere" and engine.stats().bytes_moved > 0
    tp.detach(model)
