"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
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

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
PLUGIN_BLOCKS = [b for b in BLOCKS if "@hookimpl" in b]
SCRIPT_BLOCKS = [b for b in BLOCKS if "@hookimpl" not in b]


def test_every_console_command_in_the_readme_is_a_real_subcommand():
    """The bash examples name subcommands and flags the CLI really has (argparse rejects others)."""
    from torus_adapters.apps.cli import build_parser

    shell = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    used = re.findall(r"torus-sparse ([a-z][a-z-]*)", shell)
    assert used, "the README shows no console command"
    assert set(used) <= subcommands, set(used) - subcommands


SERVER_ADDRESS = "http://127.0.0.1:8000"


@pytest.mark.parametrize("index", range(len(SCRIPT_BLOCKS)))
def test_script_example_runs(index, request):
    code = SCRIPT_BLOCKS[index]
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
    if "stats()" in SCRIPT_BLOCKS[index]:
        assert "hits=" in out.stdout  # the examples that print the engine's stats really show them


def test_architecture_plugin_example_streams_a_new_family():
    module = types.ModuleType("readme_cohere_plugin")
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
