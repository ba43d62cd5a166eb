"""The planner (`torus-sparse plan`): shapes only, and the same placement the engine chooses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers as T

import torus_plugins as tp
from torus_adapters.transformers_adapter.planning import meta_model, plan_model


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> str:
    """A 7B-class Llama config (no weights): planning must never need them."""
    d = tmp_path_factory.mktemp("llama7b")
    T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        dtype="bfloat16",
    ).save_pretrained(d)
    return str(d)


def test_meta_model_has_no_storage(llama7b_dir):
    model, _ = meta_model(llama7b_dir)
    assert all(p.is_meta for p in model.parameters())


def test_7b_plan_under_a_budget(llama7b_dir):
    plan = plan_model(llama7b_dir, tp.TorusConfig(vram_budget="12GB", lookahead=2), bandwidth="25GB/s", device="cpu")
    assert plan.fits and plan.n_layers == 32
    r = plan.residency
    assert 0 < len(r.resident) < 32 and r.n_slots == 3
    layer = 3 * 4096 * 11008 * 2  # bf16 gate/up/down
    assert r.slot_bytes >= layer and plan.streamed_bytes_per_token >= len(r.streamed) * layer
    assert plan.device_bytes + plan.kv_reserve_bytes <= 12 * 10**9
    # One more resident layer would not fit.
    assert plan.device_bytes + plan.kv_reserve_bytes + layer > 12 * 10**9
    assert plan.predicted_tok_s == pytest.approx(25e9 / plan.streamed_bytes_per_token)
    assert 'TorusConfig(vram_budget="12GB", lookahead=2)' in plan.render()


def test_quantized_plans_stream_fewer_bytes(llama7b_dir):
    cfg = tp.TorusConfig(vram_budget="12GB", resident_layers=0)
    bf16, int8, int4 = (
        plan_model(llama7b_dir, cfg.replace(weight_quant=q), bandwidth=25e9, device="cpu")
        for q in (None, "int8", "int4")
    )
    assert int8.streamed_bytes_per_token <= 0.52 * bf16.streamed_bytes_per_token
    assert int4.streamed_bytes_per_token <= 0.28 * bf16.streamed_bytes_per_token
    assert int4.predicted_tok_s > int8.predicted_tok_s > bf16.predicted_tok_s


def test_plan_is_what_the_engine_does(smollm2_path):
    config = tp.TorusConfig(vram_budget="520MB", transport="copy", lookahead=2)
    plan = plan_model(smollm2_path, config, bandwidth="10GB/s", device="cpu")
    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path)
    engine = tp.attach(model, config)
    assert engine.plan == plan.residency
    assert engine.stats().streamed_bytes_per_pass == plan.streamed_bytes_per_token
    tp.detach(model)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torus_adapters.apps.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_plan_json_and_too_small(llama7b_dir):
    out = run_cli(
        "plan", "--model", llama7b_dir, "--vram", "16GiB", "--bandwidth", "50GB/s", "--device", "cpu", "--json"
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert (
        d["fits"] and d["bandwidth_bps"] == 50e9 and d["predicted_tok_s"] > 0 and d["config"].startswith("TorusConfig(")
    )
    small = run_cli("plan", "--model", llama7b_dir, "--vram", "2GB", "--bandwidth", "50GB/s", "--device", "cpu")
    assert small.returncode == 1
    assert "fits             NO" in small.stdout and "minimum is" in small.stdout
    bad = run_cli("plan", "--model", llama7b_dir, "--vram", "2GB", "--bandwidth", "fast", "--device", "cpu")
    assert bad.returncode == 2 and "25GB/s" in bad.stderr


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("cfg", [dict(), dict(weight_quant="int8"), dict(moe_cache_experts=6)])
def test_moe_plans_place_the_experts_as_attach_does(tmp_path, arch, cfg):
    """A MoE model plans (its FFNs are routed experts, not FFN layers): the expert store, the
    cache the engine builds under the same config, and the bytes a token moves when all miss."""
    from conftest import TINY_MOE_CONFIGS, build_tiny

    TINY_MOE_CONFIGS[arch]().save_pretrained(tmp_path)  # planning reads the config alone
    config = tp.TorusConfig(transport="copy", **cfg)
    plan = plan_model(str(tmp_path), config, bandwidth="10GB/s", device="cpu", host=False)
    assert plan.fits and plan.experts is not None
    model = build_tiny(arch)
    engine = tp.attach(model, config)
    stats = engine.stats().experts
    assert plan.experts.cache_slots == engine.expert_plan.slots == stats.cache_experts
    assert plan.experts.cache_bytes == stats.cache_bytes
    assert plan.experts.unit_bytes == stats.expert_bytes
    assert plan.experts.experts == sum(s.num_experts for s in engine.expert_sites)
    tp.detach(model)
    text = plan.render()
    assert "routed experts" in text and "expert misses    at most" in text
    assert plan.as_dict()["experts"]["miss_bytes_per_token"] == plan.experts.miss_bytes_per_token > 0


def test_the_recommended_config_is_one_the_engine_accepts(tmp_path):
    """On a CPU "auto" is zero-copy, which refuses weight_quant: a quantized plan names the copy
    transport, and its `use` line builds a config that attaches."""
    from conftest import TINY_CONFIGS, build_tiny

    TINY_CONFIGS["llama"]().save_pretrained(tmp_path)
    plan = plan_model(str(tmp_path), tp.TorusConfig(weight_quant="int4"), bandwidth="10GB/s", device="cpu", host=False)
    snippet = plan.config_snippet()
    assert 'transport="copy"' in snippet
    model = build_tiny("llama")
    tp.attach(model, eval(snippet, {"TorusConfig": tp.TorusConfig}))
    tp.detach(model)


def test_disk_tier_and_lean_load_peak(tmp_path):
    """With a host_budget below the store, the plan says how many bytes each token reads from disk
    and, given the disk's speed, the disk-bound ceiling; a safetensors checkpoint's load peak is
    the lean loader's (non-FFN + store + two layers), a config-only directory's the whole model's."""
    from conftest import build_tiny

    build_tiny("llama").save_pretrained(tmp_path)
    config = tp.TorusConfig(transport="copy", resident_layers=0, host_budget="80KiB")
    plan = plan_model(str(tmp_path), config, bandwidth="10GB/s", device="cpu", host=False, disk_bandwidth="1GB/s")
    assert plan.host_bytes > 80 * 1024
    assert plan.disk_bytes_per_token == plan.streamed_bytes_per_token > 0
    assert plan.disk_tok_s == pytest.approx(1e9 / plan.disk_bytes_per_token)
    text = plan.render()
    assert "disk tier        the store" in text and "disk-bound at 1.0 GB/s" in text
    assert "host_budget=81920" in plan.config_snippet()
    model = build_tiny("llama")
    tp.attach(model, eval(plan.config_snippet(), {"TorusConfig": tp.TorusConfig}), store_cache=str(tmp_path / "s"))
    tp.detach(model)
    int4 = config.replace(weight_quant="int4", host_budget=None)
    lean = plan_model(str(tmp_path), int4, bandwidth="10GB/s", device="cpu", host=False)
    assert lean.host_load_peak_bytes < lean.non_ffn_bytes + lean.ffn_bytes  # less than the bf16 model
    (tmp_path / "model.safetensors").unlink()  # config only: a from_pretrained load
    whole = plan_model(str(tmp_path), int4, bandwidth="10GB/s", device="cpu", host=False)
    assert whole.host_load_peak_bytes > lean.host_load_peak_bytes
    roomy = plan_model(str(tmp_path), config.replace(host_budget="1GiB"), bandwidth="10GB/s", device="cpu", host=False)
    assert roomy.disk_bytes_per_token == 0 and "disk tier        off" in roomy.render()
