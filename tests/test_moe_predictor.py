"""The learned MoE expert predictor: routing traces, training, the safetensors file, `train-predictor`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import transformers as T

from torus_adapters.tools.routing_traces import add_cli, fingerprint_of, moe_routers, record_traces
from torus_plugins.errors import ConfigError
from torus_plugins.moe.predictor_net import ExpertPredictorNet, PredictorFingerprint, load_predictor, save_predictor
from torus_plugins.moe.training import RoutingTraces, train_predictor

VOCAB = 258  # the byte-level test tokenizer: 256 bytes + <s> + </s>
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB)
TINY_MOE = {
    "mixtral": lambda: T.MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, **_ATTN
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        **_ATTN,
    ),
    # first layer dense (no router): skipped, so 3 MoE layers
    "deepseek_v3": lambda: T.DeepseekV3Config(
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        **{**_ATTN, "num_key_value_heads": 4},
    ),
    # router at mlp.router
    "gpt_oss": lambda: T.GptOssConfig(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=3,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        **_ATTN,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: a second thread only adds contention on a small shared runner.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_moe(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(TINY_MOE[name]()).eval()


def random_ids(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mixtral_trained():
    model = build_moe("mixtral")
    traces = record_traces(model, None, random_ids(8, 128), 10_000)
    fp = fingerprint_of(model)
    net, report = train_predictor(traces, fp, horizon=2, epochs=12, seed=0)
    return model, traces, fp, net, report


# --------------------------------------------------------------------------------------------
# traces


@pytest.mark.parametrize(
    "name, moe_layers",
    [("mixtral", [0, 1, 2, 3]), ("qwen3_moe", [0, 1, 2, 3]), ("deepseek_v3", [1, 2, 3]), ("gpt_oss", [0, 1, 2])],
)
def test_traces_hold_each_routers_input_and_choice(name, moe_layers):
    model = build_moe(name)
    routers = moe_routers(model)
    assert [i for i, _ in routers] == moe_layers
    fp = fingerprint_of(model)
    assert fp == PredictorFingerprint(name, len(moe_layers), 8, 64, 2)
    traces = record_traces(model, None, random_ids(3, 50), 120, window=32)
    assert traces.hidden.shape == (120, len(moe_layers), 64) and traces.hidden.dtype == torch.float32
    assert traces.experts.shape == (120, len(moe_layers), 2) and traces.experts.dtype == torch.int64
    # the recorded hidden is what the router saw: re-running the router gives the recorded experts
    with torch.no_grad():
        for j, (_, router) in enumerate(routers):
            again = router(traces.hidden[:, j])[2]
            assert torch.equal(again.sort(-1).values, traces.experts[:, j].sort(-1).values)


def test_core_module_imports_neither_transformers_nor_safetensors():
    import subprocess
    import sys

    code = (
        "import sys, torus_plugins.moe.predictor_net, torus_plugins.moe.training; "
        "bad = [m for m in ('transformers', 'safetensors') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_moe_model_is_refused():
    torch.manual_seed(0)
    llama = T.AutoModelForCausalLM.from_config(
        T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    with pytest.raises(ConfigError, match="not a mixture-of-experts"):
        fingerprint_of(llama)


def test_traces_file_round_trip(tmp_path, mixtral_trained):
    _, traces, fp, _, _ = mixtral_trained
    path = tmp_path / "traces.safetensors"
    traces.save(path)
    back = RoutingTraces.load(path)
    assert back.fingerprint == fp
    assert torch.equal(back.hidden, traces.hidden) and torch.equal(back.experts, traces.experts)


# --------------------------------------------------------------------------------------------
# training


def test_trained_predictor_beats_a_uniform_guess(mixtral_trained):
    _, _, fp, _, report = mixtral_trained
    chance = {k: k / fp.num_experts for k in (2, 4)}
    assert report["heldout"]["uniform_random"][1]["recall@2"] == chance[2]
    for step in (1, 2):
        train = report["train"]["predictor"][step]
        held = report["heldout"]["predictor"][step]
        for k in (2, 4):
            assert train[f"recall@{k}"] > chance[k] + 0.3, (step, k, train)
            assert held[f"recall@{k}"] > chance[k] + 0.15, (step, k, held)
            assert held[f"precision@{k}"] == pytest.approx(held[f"recall@{k}"] * fp.top_k / k)
        assert held["recall@2"] > report["heldout"]["frequency_prior"][step]["recall@2"] + 0.05
    assert report["tokens"] == {"train": 922, "heldout": 102}


def test_second_architecture_trains_too():
    model = build_moe("qwen3_moe")
    traces = record_traces(model, None, random_ids(8, 128, seed=2), 10_000)
    net, report = train_predictor(traces, fingerprint_of(model), horizon=1, epochs=12, seed=0)
    assert net.horizon == 1 and set(report["heldout"]["predictor"]) == {1}
    assert report["train"]["predictor"][1]["recall@2"] > 0.25 + 0.35
    assert report["heldout"]["predictor"][1]["recall@2"] > 0.25 + 0.15


def test_train_checks_its_inputs(mixtral_trained):
    _, traces, fp, _, _ = mixtral_trained
    with pytest.raises(ConfigError, match="num_experts"):
        train_predictor(traces, dataclasses.replace(fp, num_experts=16))
    with pytest.raises(ConfigError, match="horizon"):
        train_predictor(traces, fp, horizon=0)
    with pytest.raises(ConfigError, match="past the last MoE layer"):
        train_predictor(traces, fp, horizon=4)


def test_predict_scores_the_next_layers(mixtral_trained):
    _, traces, fp, net, _ = mixtral_trained
    h = traces.hidden[:5, 1]
    one = net.predict(1, h[:1])
    assert one.shape == (2, fp.num_experts) and not one.requires_grad
    logits, *_ = net(torch.tensor([1]), h[:1])
    torch.testing.assert_close(one, logits[0])
    per_token = torch.stack([net.predict(1, h[t]) for t in range(5)])
    torch.testing.assert_close(net.predict(1, h), per_token.amax(0))  # T>1: max over tokens
    last = net.predict(fp.num_moe_layers - 2, h[:1])  # step 2 is past the last MoE layer
    assert torch.isfinite(last[0]).all() and torch.isneginf(last[1]).all()
    assert net.predict(0, h[:1].bfloat16()).dtype == torch.float32
    with pytest.raises(IndexError):
        net.predict(fp.num_moe_layers, h[:1])


# --------------------------------------------------------------------------------------------
# the predictor file


def test_save_load_round_trip_is_exact_and_safetensors(tmp_path, mixtral_trained):
    from safetensors import safe_open

    _, traces, fp, net, _ = mixtral_trained
    path = tmp_path / "p.safetensors"
    save_predictor(path, net, fp, 2, {"note": "test"})
    raw = path.read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch zip archive
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(net.state_dict())
    assert meta["format"] == "torus-sparse-expert-predictor" and meta["format_version"] == "1"
    assert meta["num_experts"] == "8" and meta["horizon"] == "2" and meta["note"] == "test"
    assert meta["dict_size"] == str(net.dict_size)
    back = load_predictor(path, fp)
    assert isinstance(back, ExpertPredictorNet) and back.fingerprint == fp and not back.training
    for j in range(fp.num_moe_layers):
        for tokens in (1, 7):
            h = traces.hidden[:tokens, j]
            assert torch.equal(back.predict(j, h), net.predict(j, h))


def test_load_against_another_model_names_each_field(tmp_path, mixtral_trained):
    _, _, fp, net, _ = mixtral_trained
    path = tmp_path / "p.safetensors"
    save_predictor(path, net, fp, 2)
    other = dataclasses.replace(fp, model_type="olmoe", num_experts=16)
    with pytest.raises(ConfigError) as info:
        load_predictor(path, other)
    msg = str(info.value)
    assert "model_type: file 'mixtral', model 'olmoe'" in msg
    assert "num_experts: file 8, model 16" in msg
    assert "top_k" not in msg and "hidden_size" not in msg
    assert "torus-sparse train-predictor --model" in msg


def test_bad_files_are_config_errors(tmp_path, mixtral_trained):
    _, traces, fp, net, _ = mixtral_trained
    with pytest.raises(ConfigError, match="does not exist"):
        load_predictor(tmp_path / "missing.safetensors", fp)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_predictor(garbage, fp)
    good = tmp_path / "good.safetensors"
    save_predictor(good, net, fp, 2)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_predictor(truncated, fp)
    pickled = tmp_path / "pickled.safetensors"
    torch.save(net.state_dict(), pickled)
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_predictor(pickled, fp)
    traces_file = tmp_path / "traces.safetensors"
    traces.save(traces_file)
    with pytest.raises(ConfigError, match="not a torus-sparse expert predictor"):
        load_predictor(traces_file, fp)
    with pytest.raises(ConfigError, match="horizon"):
        save_predictor(tmp_path / "x.safetensors", net, fp, 3)


# --------------------------------------------------------------------------------------------
# `torus-sparse train-predictor`


def _byte_tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="torus-sparse")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_trains_and_saves_a_loadable_predictor(tmp_path, capsys):
    model_dir = tmp_path / "tiny-mixtral"
    model = build_moe("mixtral")
    model.save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "pred.safetensors"
    rc = _run_cli(["train-predictor", "--model", str(model_dir), "--out", str(out), "--tokens", "400", "--epochs", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "frequency prior" in captured.out and "recall@2" in captured.out
    net = load_predictor(out, fingerprint_of(model))
    assert net.horizon == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "pred.pt"], "must name a .safetensors file"),
        (["--out", "p.safetensors", "--horizon", "0"], "--horizon must be at least 1"),
        (["--out", "p.safetensors", "--horizon", "4"], "reaches past the last MoE layer"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    model_dir = tmp_path / "tiny-mixtral"
    build_moe("mixtral").save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    extra = [str(tmp_path / a) if a.endswith((".pt", ".safetensors")) else a for a in extra]
    assert _run_cli(["train-predictor", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_a_dense_model(tmp_path, capsys):
    torch.manual_seed(0)
    llama = T.AutoModelForCausalLM.from_config(
        T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    llama.save_pretrained(tmp_path / "llama")
    rc = _run_cli(["train-predictor", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "p.safetensors")])
    assert rc == 2
    assert "not a mixture-of-experts model" in capsys.readouterr().err
