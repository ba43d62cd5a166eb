"""Census of the decode hot path: dispatched ops, host syncs and engine Python per layer per token.

At batch 1 on a GPU, launches (~5-10 µs of CPU each) and host syncs (a drained queue each), not
bytes, decide a step's time; both are counted the same on the CPU, so this runs anywhere. For each
tiny model (Llama, Qwen3, Mixtral, OLMoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS; the MoE ones with 16
experts, top-4) and each mode (plain = the unwrapped model, transformers' default grouped_mm
experts; plain-eager; streamed; streamed+pred = MoE with the speculative predictor; split and host =
dense host compute; int8 / int4 streamed), one greedy decode step after an 8-token prefill and one
warm step is counted (see `harness/census.py` for what counts as a sync); MoE caches hold half of
all experts, so a step sees hits and misses. Also: ops of landing one quantized matrix.

Targets (issue 27): MoE syncs/layer <= 1 and ops/layer <= 1.3x plain; dense streamed 0 syncs and
ops <= 1.2x plain; split <= 1 sync per layer; quantized landing <= 2 ops per matrix. With CUDA
(`--device cuda`), `torch.cuda.set_sync_debug_mode("warn")` also counts the syncs the runtime sees.

Run:  python benchmarks/census.py [--only olmoe,llama] [--modes plain,streamed] [--record | --out PATH]
Writes benchmarks/results/census.json with --record (scratch otherwise).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import harness
from harness import census

NAME = "census.json"
TARGETS = {
    "moe_syncs_per_layer": 1.0,
    "moe_ops_ratio": 1.3,
    "dense_streamed_syncs_per_layer": 0.0,
    "dense_streamed_ops_ratio": 1.2,
    "split_syncs_per_layer": 1.0,
    "landing_ops_per_matrix": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated models (default: {','.join(census.ARCHS)})")
    ap.add_argument("--modes", default="", help=f"comma-separated modes (default: {','.join(census.MODES)})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    harness.add_output_args(ap, NAME)
    return ap.parse_args(argv)


def verdicts(rows: list[dict], landing: list[dict]) -> dict:
    """Each target, met or not (None when the run has no row for it)."""
    plain = {r["model"]: r["ops_per_layer"] for r in rows if r["mode"] == "plain"}
    out: dict = {}

    def check(key: str, values: list[bool]) -> None:
        out[key] = all(values) if values else None

    moe = [r for r in rows if r["model"] in census.MOE and r["mode"] not in ("plain", "plain-eager")]
    check("moe_syncs_per_layer", [r["syncs_per_layer"] <= TARGETS["moe_syncs_per_layer"] for r in moe])
    check(
        "moe_ops_ratio",
        [r["ops_per_layer"] <= TARGETS["moe_ops_ratio"] * plain[r["model"]] for r in moe if r["model"] in plain],
    )
    dense = [r for r in rows if r["model"] in census.DENSE and r["mode"] == "streamed"]
    check("dense_streamed_syncs_per_layer", [r["syncs_per_layer"] <= 0 for r in dense])
    check(
        "dense_streamed_ops_ratio",
        [
            r["ops_per_layer"] <= TARGETS["dense_streamed_ops_ratio"] * plain[r["model"]]
            for r in dense
            if r["model"] in plain
        ],
    )
    split = [r for r in rows if r["mode"] in ("split", "host") and r["model"] in census.DENSE]
    check("split_syncs_per_layer", [r["syncs_per_layer"] <= TARGETS["split_syncs_per_layer"] for r in split])
    check("landing_ops_per_matrix", [x["ops"] <= TARGETS["landing_ops_per_matrix"] for x in landing])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, NAME, threads=args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    only = [n for n in args.only.split(",") if n] or list(census.ARCHS)
    wanted = {m for m in args.modes.split(",") if m}
    rows: list[dict] = []
    skipped: list[dict] = []
    for name in only:
        for mode in census.modes_for(name):
            if wanted and mode not in wanted:
                continue
            try:
                c = census.measure(name, mode)
            except Exception as exc:  # noqa: BLE001 - a mode the model cannot run is a row saying why
                harness.log(f"{name:12s} {mode:14s} refused: {type(exc).__name__}: {str(exc)[:160]}")
                skipped.append({"model": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append(c.as_dict())
            harness.log(
                f"{name:12s} {mode:14s} ops/layer {c.ops_per_layer:7.2f}  syncs/layer {c.syncs_per_layer:5.2f}  "
                f"engine py {c.engine_py_us_per_layer:6.0f} µs/layer  step {c.step_ms:6.2f} ms"
            )
    landing = [census.landing_ops(m) for m in ("int8", "int4")]
    report = {
        "benchmark": "census",
        "settings": {
            "prompt_tokens": census.PROMPT.shape[1],
            "counted": "the second greedy decode step after the prefill (one warm step first)",
            "moe": {"experts": census.EXPERTS, "top_k": census.TOP_K, "cache": "half of all experts, shared"},
            "transport": "copy",
            "resident_layers": 0,
            "sync_ops": sorted(census.SYNC_OPS),
            "engine_py": "cProfile own time of torus_plugins / torus_adapters functions (profiler overhead included)",
        },
        "environment": harness.environment(),
        "targets": TARGETS,
        "verdicts": verdicts(rows, landing),
        "rows": rows,
        "landing": landing,
        "refused": skipped,
    }
    plain = {r["model"]: r["ops_per_layer"] for r in rows if r["mode"] == "plain"}
    t = harness.table(
        "decode-step census (per layer per token)",
        ["model", "mode", "ops", "x plain", "syncs", "engine py µs", "step ms", "hits/misses", "logits = plain"],
        left=2,
    )
    for r in rows:
        ratio = f"{r['ops_per_layer'] / plain[r['model']]:.2f}" if r["model"] in plain else "-"
        hm = f"{r['expert_hits']}/{r['expert_misses']}" if r["expert_hits"] is not None else "-"
        eq = (
            "-"
            if r["logits_equal_plain"] is None
            else ("yes" if r["logits_equal_plain"] else f"{r['max_abs_diff_plain']:.1e}")
        )
        t.add_row(
            r["model"],
            r["mode"],
            f"{r['ops_per_layer']:.2f}",
            ratio,
            f"{r['syncs_per_layer']:.2f}",
            f"{r['engine_py_us_per_layer']:.0f}",
            f"{r['step_ms']:.2f}",
            hm,
            eq,
        )
    v = harness.table("targets", ["target", "bound", "verdict"])
    for key, bound in TARGETS.items():
        v.add_row(key, str(bound), harness.pass_fail(report["verdicts"].get(key)))
    for x in landing:
        v.add_row(f"landing {x['mode']} ops/matrix", "2", str(x["ops"]))
    harness.show(t, v)
    path = run.save(report)
    harness.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
