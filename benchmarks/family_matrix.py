"""Every CausalLM family of the installed transformers: does it stream identically?

For each `AutoModelForCausalLM` class (`torus_adapters.tools.families`): build it tiny (hidden
64, 2-4 layers, vocab 128, random init), attach with the copy transport, every FFN layer
streamed, lookahead 2, MoE with half the experts cached; compare logits and greedy tokens with
the plain model bit for bit; detach and check the model is restored. Prints a table and writes
JSON with the transformers version; `--markdown` also prints the table of docs/plugins.md.

Run:  python benchmarks/family_matrix.py [--only llama,mixtral] [--markdown] [--record | --out PATH]
Writes benchmarks/results/family_matrix.json with --record (scratch otherwise).
"""

from __future__ import annotations

import argparse
import collections
import sys

import harness

NAME = "family_matrix.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated family names (default: every family)")
    ap.add_argument("--markdown", action="store_true", help="also print the per-family table of docs/plugins.md")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: tiny models only lose to a thread pool)"
    )
    harness.add_output_args(ap, NAME)
    return ap.parse_args(argv)


def measure(only: set[str]) -> list[dict]:
    from torus_adapters.tools import families

    rows = []
    for family in families.families():
        if only and family.name not in only:
            continue
        outcome = families.check(family)
        rows.append({**outcome.as_dict(), "model_types": list(family.model_types)})
        harness.log(f"{family.name:28s} {outcome.status:10s} {outcome.architecture or ''} {outcome.detail[:100]}")
    return rows


def summarize(rows: list[dict]) -> dict:
    counts = collections.Counter(r["status"] for r in rows)
    built = len(rows) - counts["not-built"]
    return {
        "families": len(rows),
        "built": built,
        **{status: counts[status] for status in ("identical", "refused", "different", "error", "not-built")},
        "identical_of_built": counts["identical"] / built if built else None,
        "by_discovery": sum(1 for r in rows if r["status"] == "identical" and r["architecture"] == "discovered"),
        "target_met": bool(built)
        and counts["identical"] >= 0.9 * built
        and counts["different"] == 0
        and counts["error"] == 0,
    }


def markdown(rows: list[dict]) -> str:
    """The docs/plugins.md table: one line per status with the families in it, then every refusal."""
    by = collections.defaultdict(list)
    for r in rows:
        by[r["status"]].append(r["family"])
    lines = ["| outcome | families |", "|---|---|"]
    for status in ("identical", "refused", "different", "error", "not-built"):
        if by[status]:
            lines.append(f"| {status} ({len(by[status])}) | {', '.join(sorted(by[status]))} |")
    refused = [r for r in rows if r["status"] in ("refused", "different", "error")]
    if refused:
        lines += ["", "| family | why |", "|---|---|"]
        lines += [f"| {r['family']} | {r['detail'].split(' (a table row')[0][:300]} |" for r in refused]
    return "\n".join(lines)


def build_report(rows: list[dict], run: harness.Run) -> dict:
    return {
        "benchmark": "family_matrix",
        "settings": {
            "transport": "copy",
            "resident_layers": 0,
            "lookahead": 2,
            "moe_cache_experts": "half of all experts (shared cache)",
            "prompt_tokens": 6,
            "new_tokens": 4,
        },
        "environment": harness.environment(),
        "summary": summarize(rows),
        "families": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, NAME, threads=args.threads)
    rows = measure({n for n in args.only.split(",") if n})
    report = build_report(rows, run)
    s = report["summary"]
    t = harness.table("family matrix", ["outcome", "families"])
    for status in ("identical", "refused", "different", "error", "not-built"):
        t.add_row(status, str(s[status]))
    t.add_row("identical / built", f"{s['identical_of_built']:.1%}" if s["identical_of_built"] is not None else "-")
    t.add_row("target (>= 90%, 0 different)", harness.pass_fail(s["target_met"]))
    harness.show(t)
    if args.markdown:
        print(markdown(rows))
    path = run.save(report)
    harness.log(f"wrote {path}")
    return 0 if s["different"] == 0 and s["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
