"""Replicas on Ray Serve vs the plain server: throughput and latency at 8, 16 and 32 clients.

Setup, in one run on one machine: the embedded SmolLM2-135M-Instruct with every FFN layer streamed
through the copy ring (`transport="copy", resident_layers=0`, as serve_concurrency.py), served
three ways, each given the whole machine:
  * plain: the real `torus-sparse serve` in its own process (as each replica is in its own), torch
    using every CPU (its default);
  * ray-1: one replica behind Ray Serve's HTTP proxy, reserving every CPU;
  * ray-2: two replicas, each reserving half the CPUs (Ray sets each replica's OMP_NUM_THREADS).
The local Ray cluster (controller, proxy, replicas) and the clients share the same cores: on a
2-core machine the proxy's hops and two replicas' threads contend with each other and with the
clients. The report states the cores and the torch threads each replica had.

Clients: C threads (C = 8, 16, 32), each with its own HTTP session, each sending `--requests`
non-streamed `POST /v1/completions` one after another (greedy, `max_tokens=--tokens`, prompts
rotating over a fixed list), all starting together behind a barrier. Per level: throughput =
completion tokens / wall time from the barrier to the last answer; latency p50 and p99 over every
request of the level (with C x requests samples, p99 is close to the slowest). Three warm-up
requests per replica first. One round per level; the plain server runs first and again last
(`plain-again`), so the pair shows how far the machine's load moved the numbers during the run.

Run:  python benchmarks/serve_ray.py [--tokens 32] [--requests 2] [--record | --out PATH]
Writes benchmarks/results/scratch/serve_ray.json and .md (with --record benchmarks/results/).
Needs the ray extra: pip install 'torus-sparse[ray]'.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import Any

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads
import requests

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LEVELS = (8, 16, 32)
#: Every FFN layer streamed through the copy ring (as serve_concurrency.py), for all three setups.
ENGINE = {"transport": "copy", "resident_layers": 0}
ENGINE_FLAGS = ["--transport", "copy", "--resident-layers", "0"]
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


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(url: str, clients: int, n_requests: int, tokens: int) -> dict[str, Any]:
    barrier = threading.Barrier(clients + 1)
    done: list[tuple[int, float, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        session = requests.Session()
        barrier.wait()
        try:
            for j in range(n_requests):
                body = {"model": "x", "prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}
                start = time.perf_counter()
                r = session.post(f"{url}/v1/completions", json=body, timeout=900)
                r.raise_for_status()
                with lock:
                    done.append(
                        (
                            r.json()["usage"]["completion_tokens"],
                            time.perf_counter() - start,
                            r.headers.get("x-torus-replica", "plain"),
                        )
                    )
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
    latencies = [s for _, s, _ in done]
    total = sum(n for n, _, _ in done)
    per_replica: dict[str, int] = {}
    for _, _, rid in done:
        per_replica[rid] = per_replica.get(rid, 0) + 1
    return {
        "clients": clients,
        "requests": len(done),
        "tokens": total,
        "wall_s": round(wall, 3),
        "tok_s": total / wall,
        "requests_per_s": len(done) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "requests_per_replica": per_replica,
    }


def measure(name: str, url: str, args: argparse.Namespace, warm: int) -> list[dict[str, Any]]:
    for _ in range(warm):
        run_level(url, 1, 1, 4)
    rows = []
    for clients in LEVELS:
        row = run_level(url, clients, args.requests, args.tokens)
        print(
            f"{name}: {clients} clients: {row['tok_s']:.1f} tok/s, p50 {row['latency_p50_s']:.2f} s, "
            f"p99 {row['latency_p99_s']:.2f} s",
            flush=True,
        )
        rows.append(row)
    return rows


def plain(args: argparse.Namespace, name: str = "plain") -> dict[str, Any]:
    """The real `torus-sparse serve` in its own process (as each replica is), torch's default threads."""
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default: every CPU
    cmd = [sys.executable, "-m", "torus_adapters.apps.cli", "serve", "--port", str(port), *ENGINE_FLAGS]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("torus-sparse serve did not start")
            time.sleep(0.2)
        levels = measure(name, url, args, warm=3)
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "name": name,
        "replicas": 1,
        "cpus_per_replica": os.cpu_count(),
        "torch_threads": [os.cpu_count()],
        "levels": levels,
    }


def on_ray(replicas: int, config: Any, settings: Any, args: argparse.Namespace, url: str) -> dict[str, Any]:
    from ray import serve

    from torus_adapters.ray_serve.deployment import APP_NAME, torus_app

    cpus = (os.cpu_count() or 1) / replicas
    app = torus_app(None, config, settings, num_replicas=replicas, num_cpus=cpus)
    serve.run(app, name=APP_NAME, route_prefix="/")
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        stats = requests.get(f"{url}/torus/stats", timeout=30).json()
        seen[stats["replica"]] = stats.get("torch_threads", 0)
    try:
        levels = measure(f"ray-{replicas}", url, args, warm=3 * replicas)
    finally:
        serve.delete(APP_NAME)
    return {
        "name": f"ray-{replicas}",
        "replicas": replicas,
        "cpus_per_replica": cpus,
        "torch_threads": sorted(seen.values()),
        "levels": levels,
    }


def render_table(report: dict[str, Any]) -> str:
    st = report["settings"]
    lines = [
        f"# serve_ray ({report['date']}, {report['host']['cpus']} CPUs: {report['host']['cpu']})",
        "",
        f"SmolLM2-135M-Instruct, every FFN layer streamed (copy transport); {st['requests_per_client']} requests "
        f"per client of max_tokens={st['max_tokens']}, max_batch_size={st['max_batch_size']} per server or replica; "
        f"one round; load average {report['loadavg_before'][0]:.1f} → {report['loadavg_after'][0]:.1f}. "
        "The Ray cluster, its proxy, the replicas and the clients all share these CPUs.",
        "",
        "| setup | CPUs per replica | torch threads | clients | tok/s | vs plain | req/s | p50 (s) | p99 (s) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {lv["clients"]: lv["tok_s"] for lv in report["setups"][0]["levels"]}
    for s in report["setups"]:
        for lv in s["levels"]:
            lines.append(
                f"| {s['name']} | {s['cpus_per_replica']:g} | {', '.join(map(str, s['torch_threads']))} | "
                f"{lv['clients']} | {lv['tok_s']:.1f} | {lv['tok_s'] / base[lv['clients']]:.2f}x | "
                f"{lv['requests_per_s']:.2f} | {lv['latency_p50_s']:.2f} | {lv['latency_p99_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default 2)")
    harness.add_output_args(ap, "serve_ray.json")
    args = ap.parse_args(argv)
    run = harness.begin(args, "serve_ray.json")

    import ray
    from ray import serve

    from torus_adapters.ray_serve import proxy
    from torus_adapters.server import ServerSettings
    from torus_plugins import TorusConfig

    config = TorusConfig(**ENGINE)
    settings = ServerSettings(model_name="smollm2")
    setups = [plain(args)]
    os.environ.setdefault(proxy.ENV, proxy.CALLBACK)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            setups.append(on_ray(replicas, config, settings, args, f"http://127.0.0.1:{port}"))
    finally:
        serve.shutdown()
        ray.shutdown()
    setups.append(plain(args, "plain-again"))  # the plain server once more: how far the machine drifted
    report = {
        "benchmark": "serve_ray",
        **harness.environment(device="cpu"),
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "engine": {"transport": config.transport, "resident_layers": config.resident_layers},
        "settings": {
            "levels": list(LEVELS),
            "max_tokens": args.tokens,
            "requests_per_client": args.requests,
            "route": "POST /v1/completions (greedy, not streamed)",
            "max_batch_size": settings.max_batch_size,
            "ray": harness.package_version("ray"),
        },
        "method": "throughput = completion tokens / wall time from a shared start to the last answer; latency "
        "percentiles over every request of a level; one round per level",
        "setups": setups,
    }
    run.save(report)
    table = render_table(report)
    run.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {run.out} and {run.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
