"""MoEfication of the embedded SmolLM2 into a Qwen2-MoE checkpoint (adapters/moefy.py).

Two small builds (256 LICENSE statistics tokens, no generated chat text, about 15 s each): one with
every expert active, which must reproduce the dense model, and one with half the experts routed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from torus_adapters.tools import moefy as mf

pytestmark = pytest.mark.slow

E, SHARED = 8, 0.25  # 384 shared neurons, 8 experts of 144
#: Bound on |logits MoE - logits dense| with every expert active. The only difference is the router
#: softmax: weights k * p_e = 1 + O(ROUTER_LOGIT_STD); measured 4.2e-3 on logits of magnitude ~34.
ALL_ACTIVE_LOGIT_TOL = 2e-2
PROMPT = "The GNU Affero General Public License is a free, copyleft license for software."


def _build(smollm2_path: str, out: Path, top_k: int) -> dict:
    return mf.moefy(
        smollm2_path, out, num_experts=E, top_k=top_k, shared_fraction=SHARED, stats_tokens=256, chat_stats=False
    )


@pytest.fixture(scope="module")
def all_active(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("moe-all")
    return out, _build(smollm2_path, out, top_k=E)


@pytest.fixture(scope="module")
def routed(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("moe-routed")
    return out, _build(smollm2_path, out, top_k=E // 2)


def _load(path: Path) -> torch.nn.Module:
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_checkpoint_is_qwen2_moe_with_fused_experts(routed: tuple[Path, dict]) -> None:
    path, report = routed
    model = _load(path)
    assert isinstance(model, T.Qwen2MoeForCausalLM)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (E, E // 2, 144)
    assert cfg.shared_expert_intermediate_size == 384 and cfg.norm_topk_prob and not cfg.qkv_bias
    assert cfg.tie_word_embeddings and not cfg.use_sliding_window and cfg.mlp_only_layers == []
    for layer in model.model.layers:
        moe = layer.mlp
        assert isinstance(moe, T.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock)
        assert moe.experts.gate_up_proj.shape == (E, 2 * 144, 576)
        assert moe.experts.down_proj.shape == (E, 576, 144)
        assert layer.self_attn.q_proj.bias is None
    # On disk: one tensor per expert and projection (transformers fuses them when loading).
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {
        f"model.layers.0.mlp.experts.{e}.{n}.weight" for e in range(E) for n in ("gate_proj", "up_proj", "down_proj")
    } <= keys
    assert (path / "chat_template.jinja").is_file() and (path / "tokenizer.json").is_file()
    on_disk = json.loads((path / "moefy_report.json").read_text())
    assert on_disk["num_experts"] == E and on_disk["active_share"] == pytest.approx(0.25 + 0.75 / 2)
    assert report["ppl_dense"] == pytest.approx(20.25, abs=0.01)
    # 256 statistics tokens and half the routed experts: clearly worse than dense (measured 61.9 with
    # 0.62 agreement; the default build with 4.7k tokens gets 30.0), but not broken (that is 1000s).
    assert report["ppl_dense"] < report["ppl_oracle_routing"] <= report["ppl_moe"] * 1.05
    assert report["ppl_moe"] < 4 * report["ppl_dense"]
    assert 0.5 < report["router_agreement"] < 1


def test_routing_is_real_and_generation_runs(routed: tuple[Path, dict], smollm2_tokenizer) -> None:
    path, _ = routed
    model = _load(path)
    ids = smollm2_tokenizer(PROMPT, return_tensors="pt").input_ids
    seen = []
    hook = model.model.layers[5].mlp.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.inference_mode():
        model(ids)
    hook.remove()
    _, weights, chosen = seen[0]
    assert chosen.shape == (ids.shape[1], E // 2)
    assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1  # tokens pick different experts
    assert torch.allclose(weights, torch.full_like(weights, 2 / E), rtol=1e-3)  # ~1/k each
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    # bf16 goes through transformers' grouped_mm experts kernel, which needs 16-byte aligned rows.
    bf16 = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert torch.isfinite(bf16(ids).logits).all()


def test_all_experts_active_reproduces_dense(
    all_active: tuple[Path, dict], smollm2_path: str, smollm2_tokenizer
) -> None:
    path, report = all_active
    assert report["active_share"] == 1.0 and report["router_agreement"] == 1.0
    ids = smollm2_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        dense = _load(Path(smollm2_path))(ids).logits
        moe = _load(path)(ids).logits
    assert (moe - dense).abs().max().item() < ALL_ACTIVE_LOGIT_TOL
    assert torch.equal(moe.argmax(-1), dense.argmax(-1))
    assert report["ppl_moe"] == pytest.approx(report["ppl_dense"], rel=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--experts", "8", "--top-k", "9"], "cannot exceed"),
        (["--experts", "7", "--top-k", "2"], "do not divide"),
        (["--experts", "-4"], "positive integer"),
        (["--shared-fraction", "-0.1"], "shared_fraction"),
        (["--stats-tokens", "0"], "positive integer"),
        (["--stats-tokens", "4096"], "at most 2048"),
    ],
)
def test_cli_rejects_bad_settings(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="torus-sparse")
    mf.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["moefy", *argv])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_moefy_rejects_bad_settings_before_loading(smollm2_path: str, tmp_path: Path) -> None:
    with pytest.raises(mf.MoefyError, match="do not divide"):
        mf.moefy(smollm2_path, tmp_path, num_experts=10, top_k=2, shared_fraction=0.25, stats_tokens=256)
    assert not any(tmp_path.iterdir())
