"""Quantization speed: GB/s of bf16 input, the native quantizers against the PyTorch path, same run.

The store's int8/int4 codes are made at every attach today (and once per checkpoint when the store
is cached), so their speed is load time: a 3B model's FFN is 4.2 GB of bf16. Each row quantizes
one matrix of a real model's FFN shape (random bf16 weights ~N(0, 0.02)), best of `--repeat`, and
checks the two paths' bytes are identical. The PyTorch path is the baseline (what every load ran
before the native quantizers); it is timed on a slice of rows (rows are independent; its speed per
row is flat), the native one on the whole matrix.

Targets (issue 26, per 2 cores): int8 >= 1 GB/s, int4 >= 0.5 GB/s of bf16 input.

Run:  python benchmarks/quant_speed.py [--threads N] [--repeat 3] [--record | --out PATH]
Writes benchmarks/results/scratch/quant_speed.json; with --record benchmarks/results/quant_speed.json.
A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys

import harness  # sets the offline defaults before anything loads
import torch
from harness.record import add_output_args, begin, environment
from harness.report import pass_fail, show, table

from torus_plugins import quant, quant_native
from torus_plugins.host_compute.probe import best_time

TARGETS = {"int8": 1.0, "int4": 0.5}
#: (name, rows, cols): FFN matrices of the issue's shapes (out x in, as nn.Linear stores them); a
#: MoE layer's experts are quantized as one matrix of all their rows (rows are independent), so a
#: row times a layer's worth of work, not a few milliseconds that scheduling noise would dominate
SHAPES = [
    ("3B up_proj", 8192, 3072),
    ("3B down_proj", 3072, 8192),
    ("OLMoE layer: 64 experts' up_proj", 64 * 1024, 2048),
    ("30B-A3B layer: 128 experts' down_proj", 128 * 2048, 768),
]
BASELINE_ROWS = 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch and native threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per row; the best is kept (default 3)")
    add_output_args(ap, "quant_speed.json")
    args = ap.parse_args()
    run = begin(args, "quant_speed.json", threads=args.threads)
    if quant_native.unavailable():
        print(quant_native.unavailable(), file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows_out = []
    for name, rows, cols in SHAPES:
        w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
        part = w[:BASELINE_ROWS]
        for mode in ("int8", "int4"):
            same = all(
                torch.equal(a, b)
                for a, b in zip(quant.quantize(part, mode, 32, native=False), quant.quantize(part, mode, 32))
            )
            native_s = best_time(lambda w=w, mode=mode: quant.quantize(w, mode, 32), args.repeat)
            torch_s = (
                best_time(lambda p=part, m=mode: quant.quantize(p, m, 32, native=False), 1) * rows / BASELINE_ROWS
            )
            gbs = w.numel() * 2 / native_s / 1e9
            rows_out.append(
                {
                    "matrix": name,
                    "shape": [rows, cols],
                    "mode": mode,
                    "native_s": native_s,
                    "pytorch_s": torch_s,
                    "native_gb_s": gbs,
                    "pytorch_gb_s": w.numel() * 2 / torch_s / 1e9,
                    "speedup": torch_s / native_s,
                    "identical_bytes": same,
                    "target_gb_s": TARGETS[mode],
                    "pass": gbs >= TARGETS[mode],
                }
            )
            run.save({**environment(), "rows": rows_out})
    out = run.save({**environment(), "rows": rows_out})
    t = table(
        f"quantization speed, GB/s of bf16 input ({torch.get_num_threads()} threads)",
        ["matrix", "mode", "native", "PyTorch", "speedup", "same bytes", "target", ""],
        left=2,
    )
    for r in rows_out:
        t.add_row(
            r["matrix"],
            r["mode"],
            f"{r['native_gb_s']:.2f}",
            f"{r['pytorch_gb_s']:.3f}",
            f"{r['speedup']:.0f}x",
            "yes" if r["identical_bytes"] else "NO",
            f">= {r['target_gb_s']}",
            pass_fail(r["pass"]),
        )
    show(t, f"load average before {run.loadavg_before[0]:.1f}; written to {out}")
    return 0 if all(r["identical_bytes"] for r in rows_out) else 1


if __name__ == "__main__":
    assert harness
    sys.exit(main())
