"""benchmarks/harness: where runs write, JSON writing, the Run stamp, tables, timing, device helpers;
and every benchmark script's output flags (scratch by default, the recorded file only with --record)."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# script -> the recorded file it writes with --record (gpu checks: the full, not the --tiny, name)
SCRIPTS = {
    "cpu_decode": "cpu_decode.json",
    "overlap": "overlap.json",
    "quant_quality": "quant_quality.json",
    "moe_cache": "moe_cache.json",
    "moe_predictability": "moe_predictability.json",
    "serve_concurrency": "serve_concurrency.json",
    "serve_hostile": "serve_hostile.json",
    "gpu_check": "gpu_check.json",
    "gpu_moe_check": "gpu_moe_check.json",
}


@pytest.fixture(scope="module")
def harness():
    """The package as the scripts import it (their folder on sys.path, as `python benchmarks/x.py` has it)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("harness")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _args(harness, argv: list[str], name: str = "x.json", device_out: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    harness.add_output_args(ap, name, device_out=device_out)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- where a run writes
def test_scratch_by_default_record_on_request_out_wins(harness, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    assert harness.output_path(_args(harness, []), "x.json") == harness.SCRATCH / "x.json"
    assert harness.output_path(_args(harness, ["--record"]), "x.json") == harness.RESULTS / "x.json"
    assert harness.output_path(_args(harness, ["--out", str(tmp_path / "o.json")]), "x.json") == tmp_path / "o.json"
    assert harness.SCRATCH.parent == harness.RESULTS == BENCHMARKS / "results"


def test_out_env_only_for_device_scripts_and_record_beats_it(harness, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert harness.output_path(_args(harness, []), "x.json", device_out=True) == tmp_path / "x.json"
    assert harness.output_path(_args(harness, []), "x.json") == harness.SCRATCH / "x.json"
    assert harness.output_path(_args(harness, ["--record"]), "x.json", device_out=True) == harness.RESULTS / "x.json"


def test_out_and_record_exclude_each_other(harness):
    with pytest.raises(SystemExit):
        _args(harness, ["--record", "--out", "y.json"])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_scratch_folder_is_ignored_and_recorded_folder_is_not():
    root = BENCHMARKS.parent
    if subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=root).returncode == 0

    assert ignored("benchmarks/results/scratch/cpu_decode.json")
    assert not ignored("benchmarks/results/cpu_decode.json")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_writes_scratch_unless_recording(harness, script, monkeypatch):
    """Each script's own parser: no flag -> scratch, --record -> benchmarks/results/ (nothing else)."""
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    mod = importlib.import_module(script)
    name = SCRIPTS[script]
    assert harness.output_path(mod.parse_args([]), name) == harness.SCRATCH / name
    assert harness.output_path(mod.parse_args(["--record"]), name) == harness.RESULTS / name


# --------------------------------------------------------------------------- JSON and the Run stamp
def test_write_json_creates_folders_and_round_trips(harness, tmp_path):
    path = harness.write_json(tmp_path / "a" / "b" / "r.json", {"x": [1, 2.5, None], "s": "é"})
    text = path.read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == {"x": [1, 2.5, None], "s": "é"}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it


def test_write_json_failure_keeps_the_previous_file(harness, tmp_path):
    path = harness.write_json(tmp_path / "r.json", {"phase": 1})
    with pytest.raises(TypeError):
        harness.write_json(path, {"phase": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"phase": 1}


def test_write_json_indent(harness, tmp_path):
    harness.write_json(tmp_path / "r.json", {"a": {"b": 1}}, indent=1)
    assert (tmp_path / "r.json").read_text() == '{\n "a": {\n  "b": 1\n }\n}\n'


def test_run_save_stamps_wall_time_and_load(harness, tmp_path):
    run = harness.Run(tmp_path / "r.json")
    time.sleep(0.02)
    report = {"benchmark": "t"}
    run.save(report)
    saved = json.loads(run.out.read_text())
    assert saved == report
    assert saved["wall_s"] >= 0.02
    assert len(saved["loadavg_before"]) == 3 and len(saved["loadavg_after"]) == 3
    run.save(report)  # the GPU checks rewrite after every phase: the stamp moves on
    assert json.loads(run.out.read_text())["wall_s"] >= saved["wall_s"]


def test_environment_record(harness):
    env = harness.environment(device="cpu")
    assert set(env) == {"date", "host", "versions"}
    assert env["host"]["device"] == "cpu" and env["host"]["torch_threads"] == torch.get_num_threads()
    assert env["versions"]["torch"] == torch.__version__
    assert env["date"].endswith("+00:00")


def test_set_threads(harness):
    before = torch.get_num_threads()
    try:
        assert harness.set_threads(1) == 1 == torch.get_num_threads()
        assert harness.set_threads(None) == 1  # None leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the report
def test_table_alignment_and_rendering(harness):
    from rich.console import Console

    t = harness.table("T", ("format", "matrices", "ppl"), left=2)
    assert [c.justify for c in t.columns] == ["left", "left", "right"]
    t.add_row("int4", "all", "23.39")
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(t)
    text = console.export_text()
    assert "T" in text and "int4" in text and "23.39" in text
    assert [c.justify for c in harness.table("T", ("a", "b")).columns] == ["left", "right"]


def test_pass_fail_and_bytes(harness):
    assert [harness.pass_fail(x) for x in (True, False, None)] == ["PASS", "FAIL", "-"]
    assert harness.pass_fail(None, none="n/a") == "n/a"
    assert harness.fmt_bytes(None) == "-"
    assert harness.fmt_bytes(512) == "512 B"
    assert harness.fmt_bytes(1536) == "1.50 KiB"
    assert harness.fmt_bytes(3 * 2**30) == "3.00 GiB"


# --------------------------------------------------------------------------- timing
def test_median_rotated_and_time_guard(harness):
    assert harness.median([3.0, None, 1.0, 2.0]) == 2.0
    assert math.isnan(harness.median([None]))
    assert harness.rotated(("a", "b", "c"), 4) == ["b", "c", "a"]
    assert harness.rotated((), 3) == []
    guard = harness.TimeGuard(10.0, start=time.perf_counter() - 8.0)
    assert guard.refuse(1.0) is None
    reason = guard.refuse(5.0)
    assert reason.startswith("time guard: 8 s elapsed + 5 s predicted > --max-seconds 10")


def _tiny_llama():
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


def test_timed_generate_counts_every_token_and_excludes_prefill(harness):
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 13]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    g = harness.timed_generate(model, inputs, 6, pad_token_id=0)
    assert len(g.tokens) == 6 and len(g.times) == 6 and g.steps == 5
    assert g.t_enter <= g.times[0] and g.times == sorted(g.times) and g.times[-1] <= g.t_exit
    ms, rates = g.ms(), g.rates()
    assert ms["decode_ms_per_token"] == pytest.approx((g.times[-1] - g.times[0]) * 1e3 / 5)
    assert ms["prefill_ms"] == pytest.approx((g.times[0] - g.t_enter) * 1e3)
    assert rates["tok_per_s"] == pytest.approx(5 / (g.times[-1] - g.times[0]))
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert g.tokens == ref[0, 4:].tolist()  # the clock changes nothing
    with pytest.raises(ValueError):
        harness.timed_generate(model, inputs, 1)


# --------------------------------------------------------------------------- device helpers
def test_link_probe_on_the_cpu(harness):
    out = harness.link_bandwidth(torch.device("cpu"), {"big": 2**20, "small": 4096}, reps=3)
    for name, n in (("big", 2**20), ("small", 4096)):
        e = out[name]
        assert e["bytes"] == n and len(e["all_s"]) == 3 and e["best_s"] == min(e["all_s"])
        assert e["GBps"] == pytest.approx(n / e["best_s"] / 1e9)
    assert out["method"].startswith("no CUDA")


def test_link_probe_on_the_cuda_emulation(harness, monkeypatch):
    """The pinned path (side stream, CUDA events, copy check) against tests/fake_cuda.py's clock."""
    from fake_cuda import FakeCuda, _TorchProxy

    cuda = FakeCuda(bandwidth=4e9)
    monkeypatch.setattr(harness.device, "torch", _TorchProxy(cuda))
    with cuda.activate():
        out = harness.link_bandwidth(torch.device("cuda", 0), {"big": 8 * 2**20, "layer": 2**20}, reps=2)
    assert out["method"].startswith("pinned host -> device")
    for name in ("big", "layer"):
        assert out[name]["verified"] is True
        assert out[name]["GBps"] == pytest.approx(4.0, rel=0.05)
    assert cuda.races == []


def test_random_bf16_is_deterministic_and_skips_float32(harness):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    a = harness.random_bf16(lambda: T.LlamaForCausalLM(cfg), seed=3)
    b = harness.random_bf16(lambda: T.LlamaForCausalLM(cfg), seed=3)
    c = harness.random_bf16(lambda: T.LlamaForCausalLM(cfg), seed=4)
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in pa.values())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(pa["model.norm.weight"], torch.ones(16, dtype=torch.bfloat16))
    assert not a.training and a.config.dtype == torch.bfloat16


def test_device_helpers_on_the_cpu(harness):
    cpu = torch.device("cpu")
    assert harness.peak_allocated(cpu) is None and harness.peak_reserved(cpu) is None
    rec = harness.device_record(cpu)
    assert rec["device"].startswith("cpu (") and rec["device_memory_bytes"] is None
    if not torch.cuda.is_available():
        assert harness.pick_device(True, "t") == (cpu, "copy")
        assert harness.pick_device(False, "t") is None


def test_random_bf16_draws_from_its_own_seeded_generator(harness):
    """The draws come from a generator seeded with `seed` (not the global RNG), so a check's
    weights do not depend on what ran before; the parameters end on the host."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(123)
    a = harness.random_bf16(lambda: T.LlamaForCausalLM(cfg), seed=5, device=torch.device("cpu"))
    torch.manual_seed(456)
    b = harness.random_bf16(lambda: T.LlamaForCausalLM(cfg), seed=5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) and pa[n].device.type == "cpu" for n in pa)


def test_buffer_link_on_the_cpu_and_the_cuda_emulation(harness, monkeypatch):
    """One existing host buffer (a store's) timed to the device: a memcpy on the CPU; on the
    emulation a side-stream copy timed by events, from page-locked memory, at its bandwidth."""
    host = torch.arange(2**20, dtype=torch.int64).to(torch.uint8)
    out = harness.buffer_link(torch.device("cpu"), host, reps=2)
    assert out["bytes"] == 2**20 and out["pinned"] is False and out["method"].startswith("no CUDA")
    from fake_cuda import FakeCuda, _TorchProxy

    cuda = FakeCuda(bandwidth=2e9)
    monkeypatch.setattr(harness.device, "torch", _TorchProxy(cuda))
    with cuda.activate():
        pinned = torch.empty(2**20, dtype=torch.uint8, pin_memory=True)
        out = harness.buffer_link(torch.device("cuda", 0), pinned, reps=2)
    assert out["pinned"] is True and out["GBps"] == pytest.approx(2.0, rel=0.05)
    assert cuda.races == []


def test_sigterm_writes_the_summary_and_marks_the_cut_phase(harness, tmp_path):
    """SIGTERM inside `terminable`: the phase it cut gets an error saying so, finished ones stay,
    `finish` runs (the summary), and the script exits with 143."""
    import os
    import signal

    run = harness.Run(tmp_path / "check.json")
    c = harness.DeviceCheck(args=argparse.Namespace(), device=torch.device("cpu"), transport="copy", run=run)
    c.report = {"phases": {"done": {"tok_per_s": 1.0}, "cut": {"kind": "torus"}, "skip": {"skipped": "guard"}}}
    finished = []

    def finish():
        c.report["summary"] = {"runs": 1}
        c.save()
        finished.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        with harness.terminable(c, finish):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert exit_.value.code == 143 and finished == [True]
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["terminated"]["signal"] == "SIGTERM" and saved["summary"] == {"runs": 1}
    assert saved["phases"]["cut"]["error"].startswith("interrupted: SIGTERM")
    assert "error" not in saved["phases"]["done"] and "error" not in saved["phases"]["skip"]
    assert signal.getsignal(signal.SIGTERM) == before
