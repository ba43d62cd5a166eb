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


def beside_streams(url: str, prompt: str) -> dict[str, Any]:
    """The long request while `STREAMS` streams run; every stream's largest gap during it."""
    stamps: list[list[float]] = [[] for _ in range(STREAMS)]
    started = [threading.Event() for _ in range(STREAMS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=stream, args=(url, i, stamps[i], started[i], stop), daemon=True)
        for i in range(STREAMS)
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
            phases[name] = timed_long_request(server.url, prompt) if scenario == "alone" else beside_streams(
                server.url, prompt
            )
            phases[name]["prefill_chunks"] = counters.prefill_chunks - chunks - (4 if scenario == "streams" else 0)
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
        "engine": {"transport": s.transport, "resident_layers": s.resident_layers, "streamed_layers": s.streamed_layers},
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
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
