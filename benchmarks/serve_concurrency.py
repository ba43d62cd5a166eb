"""Serving benchmark: aggregate tokens/s of `torus-sparse serve` at 1, 2, 4 and 8 concurrent clients.

Setup: the real server (`torus_adapters.server.create_app`, uvicorn on 127.0.0.1, an ephemeral
port) over the embedded SmolLM2-135M-Instruct with an engine attached. By default every FFN layer
streams through the copy ring on every forward pass (`transport="copy", resident_layers=0`): the
case where batching matters, since one weight stream per decode step then serves the whole batch.

Clients: C threads, each with its own HTTP session, each sending `--requests` non-streaming
`POST /v1/completions` one after another (greedy, `max_tokens=--tokens`, a different raw prompt
per client). All clients start together behind a barrier.

Measured per concurrency level and round:
  * aggregate tok/s = completion tokens of all requests (from each response's `usage`) / wall
    time from the barrier to the last answer;
  * request latency (median, seconds);
  * tokens per decode step = generated tokens / decode steps (the scheduler's counters): the mean
    batch size the model actually ran;
  * streamed bytes per token = engine bytes moved / generated tokens: how far one weight stream
    was shared.
One warm-up request first; then `--repeats` rounds, each running every level once (levels in
rotated order, so none always runs first). Reported numbers are medians over rounds; `speedup` is
aggregate tok/s over the 1-client level's. The load average before and after is stored: on a
shared machine, other processes slow and scatter the numbers.

Run:  python benchmarks/serve_concurrency.py [--tokens 32] [--requests 2] [--repeats 2] [--record | --out PATH]
Writes benchmarks/results/scratch/serve_concurrency.json and .md (with --record the recorded
benchmarks/results/serve_concurrency.json and .md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import requests

from torus_plugins import TorusConfig, TorusModel

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the server's threads tokenize

LEVELS = (1, 2, 4, 8)
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a simple recipe for bread:",
    "The three most important ideas in physics are",
    "In the middle of the night, the old lighthouse keeper",
    "A short guide to planting tomatoes in spring:",
    "The city woke up slowly that morning, and",
    "Learning a new language as an adult is",
]


def run_level(url: str, clients: int, n_requests: int, tokens: int) -> dict[str, Any]:
    barrier = threading.Barrier(clients + 1)
    results: list[list[tuple[int, float]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        session = requests.Session()
        body = {"model": "x", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}
        barrier.wait()
        try:
            for _ in range(n_requests):
                start = time.perf_counter()
                r = session.post(f"{url}/v1/completions", json=body, timeout=600)
                r.raise_for_status()
                results[i].append((r.json()["usage"]["completion_tokens"], time.perf_counter() - start))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    done = [x for per_client in results for x in per_client]
    total = sum(n for n, _ in done)
    return {
        "clients": clients,
        "requests": len(done),
        "tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "latency_median_s": statistics.median(s for _, s in done),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all levels (default 2)")
    ap.add_argument("--transport", default="copy", help="engine transport (default copy)")
    ap.add_argument("--resident-layers", type=int, default=0, help="FFN layers kept resident (default 0: all stream)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    harness.add_output_args(ap, "serve_concurrency.json")
    return ap.parse_args(argv)


def measure_rounds(tm: Any, app: Any, url: str, args: argparse.Namespace) -> dict[int, list[dict[str, Any]]]:
    """One warm-up request, then `--repeats` rounds of every level in rotated order, each row with
    the scheduler's tokens per decode step and the engine's bytes per token over that level."""
    counters = app.state.service.scheduler.counters
    run_level(url, 1, 1, 4)  # warm-up
    rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in LEVELS}
    for r in range(args.repeats):
        for clients in harness.rotated(LEVELS, r):
            steps, gen = counters.decode_steps, counters.generated_tokens
            moved = tm.stats().bytes_moved
            row = run_level(url, clients, args.requests, args.tokens)
            d_gen = counters.generated_tokens - gen
            row["tokens_per_decode_step"] = (d_gen - row["requests"]) / max(1, counters.decode_steps - steps)
            row["streamed_bytes_per_token"] = (tm.stats().bytes_moved - moved) / max(1, d_gen)
            rounds[clients].append(row)
            print(f"round {r + 1}/{args.repeats}: {clients} client(s): {row['tok_s']:.2f} tok/s", flush=True)
    return rounds


def summarize(rounds: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Medians over rounds per level; speedup against the 1-client level."""
    levels = []
    for clients in LEVELS:
        rows = rounds[clients]
        levels.append(
            {
                "clients": clients,
                "tok_s": statistics.median(x["tok_s"] for x in rows),
                "tok_s_rounds": [x["tok_s"] for x in rows],
                "latency_median_s": statistics.median(x["latency_median_s"] for x in rows),
                "tokens_per_decode_step": statistics.median(x["tokens_per_decode_step"] for x in rows),
                "streamed_bytes_per_token": statistics.median(x["streamed_bytes_per_token"] for x in rows),
                "requests_per_round": rows[0]["requests"],
                "tokens_per_round": [x["tokens"] for x in rows],
            }
        )
    for level in levels:
        level["speedup"] = level["tok_s"] / levels[0]["tok_s"]
    return levels


def build_report(args: argparse.Namespace, tm: Any, levels: list[dict[str, Any]]) -> dict[str, Any]:
    s = tm.stats()
    return {
        "benchmark": "serve_concurrency",
        **harness.environment(device=str(tm.engine.device)),
        "model": {"name": "SmolLM2-135M-Instruct (embedded default)", "dtype": str(next(tm.model.parameters()).dtype)},
        "engine": {
            "transport": s.transport,
            "resident_layers": s.resident_layers,
            "streamed_layers": s.streamed_layers,
        },
        "settings": {
            "levels": list(LEVELS),
            "max_tokens": args.tokens,
            "requests_per_client": args.requests,
            "repeats": args.repeats,
            "route": "POST /v1/completions (greedy, not streamed)",
            "max_batch_size": max(LEVELS),
        },
        "method": "aggregate tok/s = completion tokens / wall time from a shared start to the last answer; "
        "medians over rounds with rotated level order",
        "levels": levels,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from torus_adapters.server import ServerSettings, create_app

    run = harness.begin(args, "serve_concurrency.json", threads=args.threads)
    config = TorusConfig(transport=args.transport, resident_layers=args.resident_layers)
    tm = TorusModel.from_pretrained(None, config, show_progress=False)
    app = create_app(tm, ServerSettings(model_name="smollm2", max_batch_size=max(LEVELS)))
    server = harness.Server(app)
    try:
        rounds = measure_rounds(tm, app, server.url, args)
    finally:
        server.stop()
    report = build_report(args, tm, summarize(rounds))
    run.save(report)
    table = render_table(report)
    run.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {run.out} and {run.out.with_suffix('.md')}")
    return 0


def render_table(report: dict[str, Any]) -> str:
    e, st = report["engine"], report["settings"]
    lines = [
        f"# serve_concurrency ({report['date']}, {report['host']['device']}, "
        f"{report['host']['torch_threads']} torch threads)",
        "",
        f"SmolLM2-135M-Instruct, transport={e['transport']}, {e['streamed_layers']} FFN layers streamed per pass; "
        f"{st['requests_per_client']} requests per client of max_tokens={st['max_tokens']}; "
        f"medians of {st['repeats']} rounds; load average {report['loadavg_before'][0]:.1f} → "
        f"{report['loadavg_after'][0]:.1f}.",
        "",
        "| clients | aggregate tok/s | speedup | median latency (s) | tokens per decode step | streamed MiB per token |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['clients']} | {lv['tok_s']:.2f} | {lv['speedup']:.2f}x | {lv['latency_median_s']:.2f} | "
            f"{lv['tokens_per_decode_step']:.2f} | {lv['streamed_bytes_per_token'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
