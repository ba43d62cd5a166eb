"""The quantized host store as a file: written at the first attach, mapped (not quantized) at the
next, never used for other weights, rebuilt when damaged, and never left half-written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

import torus_plugins as tp
import torus_plugins.host_store as host_store
from torus_plugins.errors import ConfigError

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
CASES = [("llama", dict(resident_layers=0)), ("mixtral", dict(moe_cache_experts=8))]


def _run(arch: str, cache, seed: int = 0, quant: str = "int4", **cfg) -> tuple[torch.Tensor, tp.EngineStats]:
    model = build_tiny(arch, seed=seed)
    engine = tp.attach(model, transport="copy", weight_quant=quant, store_cache=cache, **cfg)
    with torch.no_grad():
        out = model(PROMPT).logits
    stats = engine.stats()
    tp.detach(model)
    return out, stats


def _count_quantize(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = host_store.quantization.quantize
    monkeypatch.setattr(host_store.quantization, "quantize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def _stores(d: Path) -> list[Path]:
    return sorted(d.glob("*.store"))


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("arch,cfg", CASES)
def test_the_second_attach_maps_the_store_and_computes_the_same(tmp_path, monkeypatch, arch, cfg, quant):
    calls = _count_quantize(monkeypatch)
    uncached, _ = _run(arch, None, quant=quant, **cfg)
    assert calls and not list(tmp_path.iterdir())  # store_cache=None writes nothing
    first, _ = _run(arch, tmp_path, quant=quant, **cfg)
    (store,) = _stores(tmp_path)
    assert store.with_suffix(".json").exists() and not list(tmp_path.glob("*.tmp-*"))
    calls.clear()
    second, stats = _run(arch, tmp_path, quant=quant, **cfg)
    assert calls == []  # nothing quantized: every unit came from the file
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    assert stats.bytes_moved > 0 and (stats.host_store_bytes or stats.experts.expert_bytes)


def test_other_weights_never_use_a_store(tmp_path, monkeypatch):
    _run("llama", tmp_path)
    calls = _count_quantize(monkeypatch)
    other, _ = _run("llama", tmp_path, seed=1)  # same shapes, other values
    assert calls and len(_stores(tmp_path)) == 2
    assert torch.equal(other, _run("llama", None, seed=1)[0])
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[5, 7] += 1e-3  # one weight edited in memory
    tp.attach(model, transport="copy", weight_quant="int4", store_cache=tmp_path, resident_layers=0)
    tp.detach(model)
    assert len(_stores(tmp_path)) == 3


def _damage_truncate(store: Path) -> None:
    store.write_bytes(store.read_bytes()[:-100])


def _damage_flip(store: Path) -> None:
    last = json.loads(store.with_suffix(".json").read_text())["units"][-1]  # a byte inside a unit, not padding
    data = bytearray(store.read_bytes())
    data[last["offset"] + last["nbytes"] // 2] ^= 0x40
    store.write_bytes(bytes(data))


def _damage_format(store: Path) -> None:
    manifest = store.with_suffix(".json")
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 0'))


def _damage_manifest(store: Path) -> None:
    store.with_suffix(".json").unlink()


@pytest.mark.parametrize(
    "damage,why",
    [
        (_damage_truncate, "(truncated?)"),
        (_damage_flip, "do not match their checksum (corrupt)"),
        (_damage_format, "written by format 0, this is 1"),
        (_damage_manifest, "it has no manifest (an interrupted write)"),
    ],
)
@pytest.mark.parametrize("arch,cfg", CASES)
def test_a_damaged_store_is_said_in_one_line_and_rebuilt(tmp_path, caplog, monkeypatch, arch, cfg, damage, why):
    want, _ = _run(arch, tmp_path, **cfg)
    (store,) = _stores(tmp_path)
    damage(store)
    calls = _count_quantize(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="torus_plugins"):
        got, _ = _run(arch, tmp_path, **cfg)
    lines = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0] and "quantizing again and rewriting it" in lines[0]
    assert calls and torch.equal(got, want)
    calls.clear()
    assert torch.equal(_run(arch, tmp_path, **cfg)[0], want) and calls == []  # the rebuilt one is used


WRITE_FAILS = """
import logging, resource, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import build_tiny
import torus_plugins as tp
logging.basicConfig(level=logging.ERROR, format="%(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))  # a disk that fills at 8 KiB
model = build_tiny("llama")
with torch.no_grad():
    ref = model(torch.tensor([[3, 14, 15]])).logits
tp.attach(model, transport="copy", weight_quant="int8", store_cache={cache!r}, resident_layers=0)
with torch.no_grad():
    assert (model(torch.tensor([[3, 14, 15]])).logits - ref).abs().max() < 0.1  # int8: close, not equal
print("attached", tp.get_engine(model).stats().streamed_layers)
"""


def test_a_store_that_cannot_be_written_leaves_nothing_and_says_so(tmp_path):
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", WRITE_FAILS.format(tests=tests, cache=str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "attached 4"
    (line,) = [ln for ln in out.stderr.splitlines() if "cannot write" in ln]
    assert line.startswith(f"torus-sparse: cannot write the int8 FFN store to {tmp_path} (File too large)")
    assert "this attach is not cached" in line
    assert list(tmp_path.iterdir()) == []  # no partial store, no temporary file


@pytest.mark.parametrize("bad", [5, "", b"dir"])
def test_bad_store_cache_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="store_cache must be 'auto', a directory or None"):
        tp.TorusConfig(store_cache=bad)
