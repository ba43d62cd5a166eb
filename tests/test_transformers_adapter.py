"""The transformers adapter on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from conftest import load_smollm2

import torus_plugins as tp
from torus_plugins import TorusConfig, TorusModel

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]


@functools.lru_cache(maxsize=None)
def plain_reply_ids(path: str, n: int) -> torch.Tensor:
    """The unwrapped model's greedy reply to STORY: the reference every variant must equal."""
    model = load_smollm2(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok.apply_chat_template(STORY, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, enc["input_ids"].shape[1] :]


@pytest.mark.parametrize(
    "config",
    [
        TorusConfig(transport="copy", resident_layers=0, lookahead=1),
        TorusConfig(transport="copy", resident_layers=15, lookahead=3),
        TorusConfig(transport="zero-copy"),
    ],
    ids=["copy-all-streamed", "copy-half-resident", "zero-copy"],
)
def test_64_token_chat_reply_identical(smollm2_path, config):
    ref = plain_reply_ids(smollm2_path, 64)
    tm = TorusModel.from_pretrained(smollm2_path, config)
    enc = tm.encode(STORY)
    out = tm.model.generate(
        **enc, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tm.tokenizer.eos_token_id
    )
    assert torch.equal(out[0, enc["input_ids"].shape[1] :], ref)
    s = tm.stats()
    if config.transport == "copy":
        assert s.misses == 0 and s.hits == s.streamed_layers * s.forward_passes
        assert s.bytes_moved > 0
    tm.detach()


def test_default_model_answers_paris_and_streams_the_same_text():
    tm = TorusModel.from_pretrained(config=TorusConfig(transport="copy", resident_layers=10))
    text = tm.generate("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in text
    streamed = "".join(tm.stream_generate(CHAT, max_new_tokens=24))
    assert streamed == text
    s = tm.stats()
    assert s.streamed_layers == 20 and s.resident_layers == 10 and s.bytes_moved > 0
    assert "hits=" in str(s) and "peak_device=" in str(s)


def test_stopping_a_stream_early_leaves_the_model_usable(smollm2_path):
    tm = TorusModel.from_pretrained(smollm2_path, TorusConfig(transport="copy", resident_layers=0))
    expected = tm.generate(CHAT, max_new_tokens=16)
    stream = tm.stream_generate(STORY, max_new_tokens=200)
    first = [next(stream) for _ in range(3)]
    assert all(first)
    stream.close()  # the consumer walks away mid-generation
    assert tm.generate(CHAT, max_new_tokens=16) == expected
    for i, _ in enumerate(tm.stream_generate(STORY, max_new_tokens=200)):
        if i == 2:
            break  # `break` closes the generator too
    assert "".join(tm.stream_generate(CHAT, max_new_tokens=16)) == expected


def test_attach_and_detach_on_a_loaded_model(smollm2_path, smollm2_tokenizer):
    model = load_smollm2(smollm2_path)
    enc = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = model(**enc).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tp.attach(model, TorusConfig(transport="copy", resident_layers=7, lookahead=2))
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)
    tp.detach(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)


def test_pipeline_with_plugin_enabled_streams_and_matches(smollm2_path):
    plain = transformers.pipeline("text-generation", model=smollm2_path)
    assert not tp.is_attached(plain.model)
    want = plain(CHAT, max_new_tokens=32, do_sample=False)[0]["generated_text"][-1]["content"]
    with tp.enabled(transport="copy", resident_layers=0) as cfg:
        assert cfg.transport == "copy"
        pipe = transformers.pipeline("text-generation", model=smollm2_path)
    assert tp.is_attached(pipe.model)
    got = pipe(CHAT, max_new_tokens=32, do_sample=False)[0]["generated_text"][-1]["content"]
    assert got == want
    s = tp.get_engine(pipe.model).stats()
    assert s.streamed_layers == 30 and s.bytes_moved > 0 and s.misses == 0
    # After the block, loading is untouched again.
    again = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert not tp.is_attached(again)


def test_enable_disable_nest_and_complain():
    tp.enable(lookahead=1)
    tp.enable(lookahead=3)
    tp.disable()
    tp.disable()
    with pytest.raises(tp.TorusError, match="not enabled"):
        tp.disable()


def test_bad_input_gets_clear_errors(smollm2_path, tmp_path):
    with pytest.raises(tp.ModelNotFoundError, match="/no/such/model"):
        TorusModel.from_pretrained("/no/such/model")
    with pytest.raises(tp.ModelNotFoundError, match="config.json"):
        TorusModel.from_pretrained(tmp_path)
    with pytest.raises(tp.ConfigError, match="6GiB"):
        TorusConfig(vram_budget="lots")
    with pytest.raises(tp.BudgetTooSmallError, match="minimum is"):
        TorusModel.from_pretrained(smollm2_path, TorusConfig(transport="copy", vram_budget="10MB"))
    tm = TorusModel.from_pretrained(smollm2_path)
    with pytest.raises(ValueError, match="role"):
        tm.generate([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="string"):
        tm.generate([{"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="non-empty"):
        tm.generate([])
    with pytest.raises(tp.ConfigError, match="max_new_tokens"):
        tm.generate("hi", max_new_tokens=0)
    assert "Paris" in tm.generate("What is the capital of France?", max_new_tokens=16)


def _tiny_mamba() -> torch.nn.Module:
    """A family with no FFN at all (a stack of Mamba mixers): nothing discovery could stream."""
    return transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    )


def test_unknown_architecture_names_what_was_found_and_the_hook():
    with pytest.raises(tp.UnsupportedArchitectureError) as err:
        tp.attach(_tiny_mamba())
    msg = str(err.value)
    assert "'mamba'" in msg and "no FFN" in msg and "mixer (MambaMixer)" in msg
    assert "torus_register_architectures" in msg


def test_enabled_refuses_a_model_no_plugin_knows_unless_opted_in(tmp_path):
    """Silently loading unstreamed would ignore the budget: it is an error, or an explicit opt-in."""
    _tiny_mamba().save_pretrained(tmp_path)
    with tp.enabled(transport="copy"), pytest.raises(tp.UnsupportedArchitectureError) as err:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "'mamba'" in str(err.value) and "allow_unstreamed=True" in str(err.value)
    with tp.enabled(transport="copy", allow_unstreamed=True):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not tp.is_attached(model)
