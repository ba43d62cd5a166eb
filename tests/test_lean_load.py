"""The lean loader: a model built without its FFN weights equals `from_pretrained`'s once attach has
read them from the checkpoint, tensor by tensor (same store codes, same tokens, same detach)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import PROMPT, TINY_CONFIGS, TINY_MOE_CONFIGS, build_tiny
from safetensors.torch import load_file, save_file

from torus_adapters.transformers_adapter.lean_load import NotLean, load_lean
from torus_plugins import IncompatibleModelError, TorusConfig, TorusModel, attach, detach
from torus_plugins.lifecycle import is_attached
from torus_plugins.weight_source import SOURCE_ATTR

ARCHS = sorted(TINY_CONFIGS) + sorted(TINY_MOE_CONFIGS)


def _saved(tmp_path: Path, name: str, **kwargs) -> str:
    d = tmp_path / name
    build_tiny(name).save_pretrained(d, **kwargs)
    return str(d)


def _filled(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The lean model's state dict with each empty parameter read from its source."""
    source = model.__dict__[SOURCE_ATTR]
    sd = model.state_dict()
    for name, p in model.named_parameters():
        if p.is_meta:
            sd[name] = source.read(name)
    return sd


@pytest.mark.parametrize("name", ARCHS)
def test_lean_model_equals_from_pretrained(tmp_path: Path, name: str) -> None:
    d = _saved(tmp_path, name)
    ref = T.AutoModelForCausalLM.from_pretrained(d).eval()
    lean = load_lean(d)
    streamed = {n for n, p in lean.named_parameters() if p.is_meta}
    assert streamed, "the lean model left no FFN parameter empty"
    assert all(("mlp" in n or "feed_forward" in n or "experts" in n or "fc" in n) for n in streamed), streamed
    ref_sd, sd = ref.state_dict(), _filled(lean)
    assert sd.keys() == ref_sd.keys()
    for key, t in ref_sd.items():
        assert sd[key].dtype == t.dtype and torch.equal(sd[key], t), key
    assert lean.generation_config.to_dict() == ref.generation_config.to_dict()
    assert lean.config._attn_implementation == ref.config._attn_implementation


@pytest.mark.parametrize("quant", [None, "int4"])
@pytest.mark.parametrize("name", ["llama", "olmoe", "gpt_oss", "deepseek_v3"])
def test_attach_reads_the_checkpoint(tmp_path: Path, name: str, quant: str | None) -> None:
    # Several shards: a layer's tensors may sit in different files.
    d = _saved(tmp_path, name, max_shard_size="20KB")
    assert len(list(Path(d).glob("*.safetensors"))) > 1
    config = TorusConfig(transport="copy", resident_layers=0, weight_quant=quant, store_cache=None)
    ref = T.AutoModelForCausalLM.from_pretrained(d).eval()
    lean = load_lean(d)
    e_ref, e_lean = attach(ref, config), attach(lean, config)

    def views(store):
        return [v for pk, b in zip(store.layers, store.buffers) if b is not None for v in pk.transfer.views(b)]

    pairs = [(e_ref.store, e_lean.store)] + ([(e_ref.experts.store, e_lean.experts.store)] if e_ref.experts else [])
    compared = 0
    for a, b in pairs:
        va, vb = views(a), views(b)
        assert len(va) == len(vb) and all(torch.equal(x, y) for x, y in zip(va, vb))
        compared += len(va)
    assert compared > 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(lean.generate(PROMPT, **kw), ref.generate(PROMPT, **kw))
    detach(lean)
    detach(ref)
    ref_sd, sd = ref.state_dict(), lean.state_dict()
    for key, t in ref_sd.items():  # the FFN weights come back from the store, on the CPU
        assert sd[key].device.type == "cpu" and torch.equal(sd[key], t), key


def test_torus_model_loads_lean_and_generates_as_before(tmp_path: Path) -> None:
    d = _saved(tmp_path, "qwen3_moe")
    tok_free = dict(tokenizer=object())  # generation below works on ids; no tokenizer in the dir
    config = TorusConfig(transport="copy", resident_layers=0)
    lean = TorusModel.from_pretrained(d, config, **tok_free)
    plain = TorusModel.from_pretrained(d, config, lean=False, **tok_free)
    assert SOURCE_ATTR in lean.model.__dict__ and SOURCE_ATTR not in plain.model.__dict__
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(lean.model.generate(PROMPT, **kw), plain.model.generate(PROMPT, **kw))


def test_missing_tensor_falls_back_with_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = Path(_saved(tmp_path, "llama"))
    weights = load_file(d / "model.safetensors")
    gone = next(k for k in weights if "down_proj" in k)
    del weights[gone]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotLean, match="no tensor for FFN parameter"):
        load_lean(d)
    gone_attn = next(k for k in weights if "q_proj" in k)
    del weights[gone_attn]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotLean, match="no tensor for"):
        load_lean(d)
    # TorusModel then loads through transformers, saying why in one line.
    with caplog.at_level(logging.INFO, logger="torus_adapters.transformers_adapter.torus_model"):
        tm = TorusModel.from_pretrained(str(d), TorusConfig(transport="copy"), tokenizer=object())
    assert SOURCE_ATTR not in tm.model.__dict__
    assert any("through transformers" in r.getMessage() and "no tensor for" in r.getMessage() for r in caplog.records)


def test_not_lean_cases(tmp_path: Path) -> None:
    d = Path(_saved(tmp_path, "llama"))
    with pytest.raises(NotLean, match="options quantization_config"):
        load_lean(d, quantization_config=None)
    with pytest.raises(NotLean, match="not a local checkpoint directory"):
        load_lean(tmp_path / "absent")
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotLean, match="not in safetensors format"):
        load_lean(tmp_path / "empty")


def test_a_source_with_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    lean = load_lean(_saved(tmp_path, "llama"))
    source = lean.__dict__[SOURCE_ATTR]
    real = source.read

    def wrong(name: str, index: int | None = None) -> torch.Tensor:
        return real(name, index)[:-1]

    source.read = wrong
    with pytest.raises(IncompatibleModelError, match="but the model's parameter is"):
        attach(lean, TorusConfig(transport="copy"))
    assert not is_attached(lean)
    assert any(p.is_meta for p in lean.parameters())  # left as it was: nothing read, nothing bound


def test_empty_parameters_without_a_source_are_refused(tmp_path: Path) -> None:
    lean = load_lean(_saved(tmp_path, "llama"))
    del lean.__dict__[SOURCE_ATTR]
    with pytest.raises(IncompatibleModelError, match="meta device"):
        attach(lean, TorusConfig(transport="copy"))
