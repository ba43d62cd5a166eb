"""Head-of-line blocking benchmark: how long do running streams stall while a long prompt prefills?

Setup: the real server (`create_app`, uvicorn on 127.0.0.1) over the embedded SmolLM2-135M-Instruct
with the default engine. The long request is `POST /v1/completions` with a raw prompt of
`--prompt-tokens` tokens (default 8,000, the model's window is 8,192) and `max_tokens=1`, so its
time is its prefill (plus one sampling step and tokenizing).

Phases, each on its own app over the same model (one runs at a time):
  one-shot   the long request alone on a scheduler that prefills it in one pass
             (`prefill_chunk` = the prompt's length: what the server did before chunked prefill);
  chunked    the same request alone with the default settings (chunks of ~`prefill_slice`);
  beside     4 streams (`/v1/completions`, end tokens banned, long replies) running, then the
             long request with the default settings. Every stream's token events are timed; the
             stall is the largest gap between two events of one stream (or from the long request's
             start to a stream's first event after it) while the long request is in flight.
  before     (`--before`) the `beside` scenario on the one-pass scheduler: the stall chunking removes.

Targets (issue 28): largest gap <= 1 s beside 4 streams; prefill throughput of the chunked prompt
>= 0.8x of the one-shot prefill (alone, both).

Run:  python benchmarks/serve_stall.py [--prompt-tokens 8000] [--before] [--record | --out PATH]
Writes benchmarks/results/scratch/serve_stall.json and .md (with --record the recorded
benchmarks/results/serve_stall.json and .md).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import requests

from torus_plugins import TorusModel

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: the streams cannot end early
STREAMS = 4
GAP_TARGET_S = 1.0
THROUGHPUT_TARGET = 0.8


def long_prompt(tm: Any, tokens: int) -> str:
    """A raw prompt of about `tokens` tokens (ordinary prose, repeated)."""
    base = "The lighthouse keeper climbed the stairs each night, counting the steps and the ships. "
    ids = tm.tokenizer(base * (tokens // 8 + 10), add_special_tokens=False)["input_ids"][:tokens]
    return tm.tokenizer.decode(ids)


def timed_long_request(url: str, prompt: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=3600)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return {"seconds": elapsed, "prompt_tokens": r.json()["usage"]["prompt_tokens"], "t0": t0, "t1": t0 + elapsed}


def stream(url: str, index: int, stamps: list[float], started: threading.Event, stop: threading.Event) -> None:
    body = {"prompt": f"Story {index}: once upon a time", "max_tokens": 4000, "stream": True, "logit_bias": NO_EOS}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                stamps.append(time.perf_counter())
                started.set()
            if stop.is_set():
                return


class SchedulerTrace:
    """The scheduler's own clock: every prefill chunk (tokens, where it started, seconds) and decode
    step (rows, seconds), recorded by wrapping the two methods of one scheduler instance."""

    def __init__(self, scheduler: Any) -> None:
        self.chunks: list[tuple[float, float, int, int]] = []  # start, end, tokens, tokens before it
        self.decodes: list[tuple[float, float, int]] = []  # start, end, rows
        chunk, decode = scheduler._prefill_chunk, scheduler._decode_step

        def traced_chunk(item: Any, n: int) -> None:
            at, t = item.done, time.perf_counter()
            chunk(item, n)
            self.chunks.append((t, time.perf_counter(), n, at))

        def traced_decode() -> None:
            rows, t = len(scheduler._active), time.perf_counter()
            decode()
            self.decodes.append((t, time.perf_counter(), rows))

        scheduler._prefill_chunk, scheduler._decode_step = traced_chunk, traced_decode

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """What the scheduler did between `t0` and `t1`: the long prompt's chunks, the decode steps,
        and the largest time between the ends of two decode steps (the stall a stream sees, less the
        delivery to the client)."""
        chunks = [c for c in self.chunks if t0 <= c[0] <= t1]
        decodes = [d for d in self.decodes if t0 <= d[1] <= t1]
        ends = [t0, *(d[1] for d in decodes)]
        worst = max(zip(ends, ends[1:]), key=lambda ab: ab[1] - ab[0], default=None)
        inside = (
            {
                "chunks": [{"tokens": n, "seconds": b - a} for a, b, n, _ in chunks if worst[0] <= a < worst[1]],
                "decode_s": [b - a for a, b, _ in decodes if worst[0] < b <= worst[1]],
            }
            if worst
            else None
        )
        secs = sorted(c[1] - c[0] for c in chunks)
        slowest = sorted(chunks, key=lambda c: c[0] - c[1])[:5]
        return {
            "chunks": len(chunks),
            "chunk_tokens_median": sorted(c[2] for c in chunks)[len(chunks) // 2] if chunks else None,
            "chunk_s_median": secs[len(secs) // 2] if secs else None,
            "chunk_s_max": secs[-1] if secs else None,
            "slowest_chunks": [{"tokens": n, "at_token": at, "seconds": b - a} for a, b, n, at in slowest],
            "decode_steps": len(decodes),
            "decode_s_median": sorted(d[1] - d[0] for d in decodes)[len(decodes) // 2] if decodes else None,
            "decode_s_max": max((d[1] - d[0] for d in decodes), default=None),
            "largest_turn_s": max((b - a for a, b in zip(ends, ends[1:])), default=None),
            "largest_turn": inside,  # what ran in it
        }


def beside_streams(url: str, prompt: str) -> dict[str, Any]:
    """The long request while `STREAMS` streams run; every stream's largest gap during it."""
    stamps: list[list[float]] = [[] for _ in range(STREAMS)]
    started = [threading.Event() for _ in range(STREAMS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=stream, args=(url, i, stamps[i], started[i], stop), daemon=True) for i in range(STREAMS)
    ]
    for t in threads:
        t.start()
    for e in started:
        e.wait(600)
    time.sleep(2.0)  # the streams settle into one decode batch
    before = [s[:] for s in stamps]
    long = timed_long_request(url, prompt)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(120)
    gaps, steady = [], []
    for mine, old in zip(stamps, before):
        inside = [t for t in mine if long["t0"] <= t <= long["t1"]]
        after = [t for t in mine if t > long["t1"]][:1]
        points = [long["t0"], *inside, *after]
        gaps.append(max(b - a for a, b in zip(points, points[1:])) if len(points) > 1 else long["seconds"])
        tail = old[-10:]
        steady.append(sorted(b - a for a, b in zip(tail, tail[1:]))[len(tail) // 2 - 1] if len(tail) > 2 else None)
    return {
        **long,
        "largest_gap_s": max(gaps),
        "largest_gap_per_stream_s": gaps,
        "events_during": [sum(long["t0"] <= t <= long["t1"] for t in s) for s in stamps],
        "median_gap_before_s": steady,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=8000)
    ap.add_argument("--before", action="store_true", help="also run the streams beside a one-pass prefill")
    ap.add_argument("--slice", type=float, default=None, help="prefill_slice seconds (default: the server's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    harness.add_output_args(ap, "serve_stall.json")
    args = ap.parse_args(argv)
    from torus_adapters.server import ServerSettings, create_app

    run = harness.begin(args, "serve_stall.json", threads=args.threads)
    tm = TorusModel.from_pretrained(None, show_progress=False)
    prompt = long_prompt(tm, args.prompt_tokens)

    def app(chunk: int | None) -> Any:
        extra = {} if args.slice is None else {"prefill_slice": args.slice}
        return create_app(tm, ServerSettings(model_name="smollm2", prefill_chunk=chunk, **extra))

    phases: dict[str, Any] = {}
    one_pass = args.prompt_tokens + 64
    for name, chunk, scenario in (
        ("one_shot", one_pass, "alone"),
        ("chunked", None, "alone"),
        ("beside", None, "streams"),
        *((("before", one_pass, "streams"),) if args.before else ()),
    ):
        a = app(chunk)
        server = harness.Server(a)
        try:
            timed_long_request(server.url, "Warm up.")
            counters = a.state.service.scheduler.counters
            chunks = counters.prefill_chunks
            trace = SchedulerTrace(a.state.service.scheduler)
            phases[name] = (
                timed_long_request(server.url, prompt) if scenario == "alone" else beside_streams(server.url, prompt)
            )
            phases[name]["prefill_chunks"] = counters.prefill_chunks - chunks - (4 if scenario == "streams" else 0)
            phases[name]["scheduler"] = trace.summary(phases[name]["t0"], phases[name]["t1"])
        finally:
            server.stop()
            a.state.service.scheduler.close()
        print(f"{name}: {phases[name]['seconds']:.1f} s", flush=True)
        for p in phases.values():
            p.pop("t0", None), p.pop("t1", None)

    s = tm.stats()
    ratio = phases["one_shot"]["seconds"] / phases["chunked"]["seconds"]
    beside_ratio = phases["one_shot"]["seconds"] / phases["beside"]["seconds"]
    report = {
        "benchmark": "serve_stall",
        **harness.environment(device=str(tm.engine.device)),
        "model": {"name": "SmolLM2-135M-Instruct (embedded default)", "dtype": str(next(tm.model.parameters()).dtype)},
        "engine": {
            "transport": s.transport,
            "resident_layers": s.resident_layers,
            "streamed_layers": s.streamed_layers,
        },
        "settings": {
            "prompt_tokens": phases["one_shot"]["prompt_tokens"],
            "streams": STREAMS,
            "prefill_slice_s": ServerSettings().prefill_slice if args.slice is None else args.slice,
        },
        "phases": phases,
        "chunked_throughput_vs_one_shot": ratio,
        "beside_throughput_vs_one_shot": beside_ratio,
        "largest_gap_s": phases["beside"]["largest_gap_s"],
        "targets": {
            "largest_gap_s": GAP_TARGET_S,
            "gap_pass": phases["beside"]["largest_gap_s"] <= GAP_TARGET_S,
            "throughput_ratio": THROUGHPUT_TARGET,
            "throughput_pass": ratio >= THROUGHPUT_TARGET,
        },
    }
    run.save(report)
    table = render_table(report)
    run.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {run.out} and {run.out.with_suffix('.md')}")
    return 0


def render_table(report: dict[str, Any]) -> str:
    ph, t = report["phases"], report["targets"]
    n = report["settings"]["prompt_tokens"]
    lines = [
        f"# serve_stall ({report['date']}, {report['host']['device']}, {report['host']['torch_threads']} torch threads)",
        "",
        f"SmolLM2-135M-Instruct, transport={report['engine']['transport']}; a {n}-token prompt (max_tokens 1) "
        f"alone and beside {report['settings']['streams']} streams; load average {report['loadavg_before'][0]:.1f}"
        f" → {report['loadavg_after'][0]:.1f}.",
        "",
        "| phase | prefill chunks | request time (s) | prompt tok/s | largest stream gap (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, p in ph.items():
        gap = f"{p['largest_gap_s']:.2f}" if "largest_gap_s" in p else "-"
        lines.append(f"| {name} | {p['prefill_chunks']} | {p['seconds']:.1f} | {n / p['seconds']:.0f} | {gap} |")
    lines += [
        "",
        f"Largest gap beside 4 streams: {report['largest_gap_s']:.2f} s (target <= {t['largest_gap_s']} s: "
        f"{'PASS' if t['gap_pass'] else 'FAIL'}). Chunked prefill throughput alone: "
        f"{report['chunked_throughput_vs_one_shot']:.2f}x one-shot (target >= {t['throughput_ratio']}: "
        f"{'PASS' if t['throughput_pass'] else 'FAIL'}); beside the streams, which take their decode steps "
        f"between its chunks: {report['beside_throughput_vs_one_shot']:.2f}x.",
    ]
    sc = ph["beside"].get("scheduler")
    if sc and sc["chunks"]:
        slow = sc["slowest_chunks"][0]
        lines += [
            "",
            f"Beside the streams, on the scheduler's clock: {sc['chunks']} chunks of the long prompt (median "
            f"{sc['chunk_tokens_median']} tokens, {sc['chunk_s_median']:.2f} s; slowest {slow['seconds']:.2f} s, "
            f"{slow['tokens']} tokens from token {slow['at_token']}), {sc['decode_steps']} decode steps (median "
            f"{sc['decode_s_median']:.3f} s, slowest {sc['decode_s_max']:.3f} s); the longest time between the ends "
            f"of two decode steps was {sc['largest_turn_s']:.2f} s ("
            + ", ".join(f"a {c['tokens']}-token chunk {c['seconds']:.2f} s" for c in sc["largest_turn"]["chunks"])
            + "".join(f", a decode step {d:.2f} s" for d in sc["largest_turn"]["decode_s"])
            + "; a stream's gap adds the delivery to its client).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
