"""`torus-sparse bench`: real runs on the embedded SmolLM2 (no mocks, no timing assertions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from torus_adapters.apps.cli import main
from torus_adapters.tools import bench, bench_report
from torus_plugins import ConfigError

EXE = shutil.which("torus-sparse") or ""
FIELDS = (
    "decode_tok_s",
    "ttft_s",
    "prefill_tok_s",
    "peak_device_bytes",
    "bytes_per_token",
    "hit_rate",
    "link_ceiling_tok_s",
    "pct_of_ceiling",
    "predicted_tok_s",
    "text_equal",
    "status",
    "method",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small bench through the console entry point: baseline, torus int8, int4 and fp32, accelerate.

    The quantized variants run before fp32 on purpose: detaching a quantized engine leaves lossy
    weights behind, so the fp32 variant is the original model only if the bench reloads the
    checkpoint after them. int4 runs at group 128 here (`--quant-group-size`): coarse enough that
    its dequantized weights change this prompt's greedy text within 12 tokens (the default group
    32 is too faithful for that), so a missing reload shows as fp32 tokens differing from the
    baseline's; the test below checks that int4 really did change them."""
    from transformers.utils import logging as hf_logging

    out = tmp_path_factory.mktemp("bench")
    bars = hf_logging.is_progress_bar_enabled()
    argv = ["bench", "--tokens", "12", "--lookahead", "1", "--weight-quant", "int8", "int4", "none"]
    argv += ["--quant-group-size", "128"]
    argv += ["--link-bandwidth", "8GB/s", "--repeats", "1", "--out", str(out)]
    try:
        rc = main(argv)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    report = json.loads((out / "bench.json").read_text())
    return rc, {v["name"]: v for v in report["variants"]}, report, out


@pytest.mark.slow
def test_exit_0_and_json_holds_every_variant_with_every_field(run):
    rc, variants, report, _ = run
    assert rc == 0
    assert list(variants) == ["baseline", "torus la=1 int8", "torus la=1 int4", "torus la=1", "accelerate"]
    for v in variants.values():
        assert v["status"] == "ok", v
        assert all(f in v for f in FIELDS), set(FIELDS) - set(v)
        assert v["decode_tok_s"] > 0 and v["ttft_s"] > 0 and v["prefill_tok_s"] > 0
        assert len(v["tokens"]) == 12
    s = report["settings"]
    assert s["transport"] == "simulated-link" and s["bandwidth_bps"] == 8e9 and s["prompt_tokens"] > 0
    assert report["reference"] == "baseline"


@pytest.mark.slow
def test_torus_streams_with_full_hit_rate_and_decodes_the_baselines_tokens(run):
    _, v, _, _ = run
    torus = v["torus la=1"]
    assert torus["text_equal"] is True and torus["tokens"] == v["baseline"]["tokens"]
    assert torus["bytes_per_token"] > 0 and torus["hit_rate"] == 1.0
    assert torus["peak_device_bytes"] > 0
    # The ceiling is bandwidth / measured bytes per token; the plan predicts it for the same config.
    assert torus["link_ceiling_tok_s"] == pytest.approx(8e9 / torus["bytes_per_token"])
    assert torus["extra"]["plan_matches_engine"] is True
    assert torus["predicted_tok_s"] == pytest.approx(8e9 / torus["extra"]["plan"]["streamed_bytes_per_token"])
    assert v["accelerate"]["text_equal"] is True and "cpu_offload" in v["accelerate"]["method"]
    assert v["baseline"]["bytes_per_token"] == 0


@pytest.mark.slow
def test_lossy_int4_ran_before_fp32_and_the_bench_reloaded_the_checkpoint(run):
    _, v, report, _ = run
    assert report["settings"]["quant_group_size"] == 128
    # int4 at group 128 changes the greedy text: the fp32 run after it can only match the
    # baseline (checked above) if the bench reloaded the original weights in between.
    assert v["torus la=1 int4"]["tokens"] != v["baseline"]["tokens"]
    assert v["torus la=1"]["tokens"] == v["baseline"]["tokens"]


@pytest.mark.slow
def test_int8_moves_at_most_0_3x_the_fp32_bytes(run):
    _, v, _, _ = run
    fp32, int8 = v["torus la=1"], v["torus la=1 int8"]
    assert 0 < int8["bytes_per_token"] <= 0.3 * fp32["bytes_per_token"]
    assert int8["lossy"] is True and int8["hit_rate"] == 1.0


@pytest.mark.slow
def test_chart_is_a_png(run):
    *_, out = run
    png = (out / "bench.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_too_small_is_one_clear_line_and_exit_2(tmp_path):
    argv = ["bench", "--vram", "1MB", "--tokens", "4", "--out", str(tmp_path / "r")]
    cmd = [EXE, *argv] if EXE else [sys.executable, "-m", "torus_adapters.apps.cli", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("torus-sparse: error:") and "minimum is" in out.stderr, out.stderr
    assert not (tmp_path / "r").exists()  # nothing loaded or written


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tokens": 1}, "--tokens"),
        ({"repeats": 0}, "--repeats"),
        ({"lookaheads": (0,)}, "--lookahead"),
        ({"weight_quants": ("fp8",)}, "--weight-quant"),
        ({"quant_group_size": 7}, "--quant-group-size"),
    ],
)
def test_bad_settings_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        bench.BenchSettings(**kw)


def test_variants_run_baseline_then_lookahead_by_quant_then_accelerate():
    s = bench.BenchSettings(lookaheads=(1, 2), weight_quants=(None, "int4"))
    assert [x.name for x in bench.variant_specs(s)] == [
        "baseline",
        "torus la=1",
        "torus la=2",
        "torus la=1 int4",
        "torus la=2 int4",
        "accelerate",
    ]
    s = bench.BenchSettings(baseline=False, accelerate=False)
    assert [x.name for x in bench.variant_specs(s)] == ["torus la=2"]


def test_reference_is_the_baseline_else_the_first_lossless_variant():
    def r(name, kind, tokens, lossy=False):
        return bench_report.VariantResult(name, kind, tokens=tokens, lossy=lossy)

    rs = [r("q", "torus", [1, 2], lossy=True), r("t", "torus", [1, 3]), r("a", "accelerate", [1, 3])]
    assert bench_report.compare_texts(rs) == "t"
    assert [x.text_equal for x in rs] == [False, True, True]
    rs = [r("b", "baseline", [1, 2]), *rs]
    assert bench_report.compare_texts(rs) == "b"
    assert [x.text_equal for x in rs] == [True, True, False, False]
