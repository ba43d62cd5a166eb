"""CPU decode benchmark: does attaching torus-sparse cost anything when nothing has to stream?

Model: the embedded SmolLM2-135M-Instruct (`default_model_path()`), loaded with transformers'
`AutoModelForCausalLM` in float32. Prompt: a fixed chat turn rendered with the tokenizer's chat
template. Decoding: greedy, batch 1, KV cache on, exactly `--tokens` new tokens
(`min_new_tokens == max_new_tokens`, so every variant decodes the same count even if one of them
would have hit EOS).

Variants (one model instance each, loaded from the same checkpoint):

    plain        no engine
    resident     attach(transport="copy", resident_layers=<all FFN layers>)
    zero-copy    attach(transport="zero-copy")            compute reads the packed host store
    copy-stream  attach(transport="copy", resident_layers=0, lookahead=2)
                 every FFN layer goes through the slot ring on every token (the CPU twin of the
                 CUDA path: same ring, fences and prefetch, a background thread does the copy)

Method.
  * After loading, every parameter is copied out of the safetensors memory map into ordinary
    anonymous memory (transformers maps the file; the engine's packed store is anonymous memory),
    so all variants read weights from the same kind of memory and the plain baseline is not
    penalised or favoured by file-backed pages.
  * Timing: a `LogitsProcessor` that only records `time.perf_counter()` is appended to the
    generation. `generate()` calls it exactly once per new token, right after the forward pass
    that produced that token's logits. Call 0 follows the prefill; calls 1..N-1 each follow one
    decode step. So

        prefill_ms        = t[0] - (time generate() was entered)
        decode_ms/token   = (t[N-1] - t[0]) / (N-1)

    which excludes prefill and generate()'s set-up but includes everything a decode step costs
    (forward, engine hooks and waits, argmax, cache update, stopping checks). One run gives both
    numbers, so no subtraction of two noisy runs is needed.
  * One untimed warm-up generation per variant, then `--repeats` rounds. In each round every
    variant runs once; the order rotates from round to round so no variant always runs first or
    right after the streaming one. Reported numbers are medians over rounds.
  * ratio = median over rounds of (variant ms/token / plain ms/token in the same round): paired
    by round, so slow drift of the machine cancels. `spread` = (max - min) / median of a
    variant's own rounds: a difference to plain smaller than plain's spread is noise.
  * Engine counters are reset before every timed generation: bytes/token = bytes_moved /
    forward_passes (one forward pass per generated token), hit rate = hits / (hits + misses) over
    streamed-layer accesses ("n/a" when nothing streams), stall = time compute waited for a copy.
  * `torch.set_num_threads(--threads)` (default: all CPUs) once, for every variant. The
    copy-stream variant's copy worker is one extra thread that competes for the same cores.
  * The load average before and after is stored: on a shared machine other processes inflate and
    scatter the numbers (min ms/token is stored too, as the least-disturbed run).
  * Target (from the project): resident and zero-copy within 3% of plain (ratio <= 1.03).
    PASS/FAIL is reported per variant; the script exits 0 either way (a benchmark, not a test).

Run:  python benchmarks/cpu_decode.py [--tokens 64] [--repeats 5] [--out PATH]
Writes benchmarks/results/cpu_decode.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torus_plugins as tp  # noqa: E402
from torus_plugins import TorusConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cpu_decode.json"
TARGET_RATIO = 1.03  # resident and zero-copy within 3% of plain
TARGETED = ("resident", "zero-copy")
VARIANTS = ("plain", "resident", "zero-copy", "copy-stream")
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain in a few sentences why the sky is blue, then give one everyday example."},
]


class StepClock:
    """A logits processor that timestamps each generated token and changes nothing."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    # Out of the safetensors memory map into anonymous memory (see the module docstring).
    # named_parameters() yields tied weights once, so tying survives.
    for _, p in model.named_parameters():
        p.data = p.data.clone()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.clone()
    return model


def config_for(variant: str, n_layers: int) -> TorusConfig | None:
    if variant == "plain":
        return None
    if variant == "resident":
        return TorusConfig(transport="copy", device="cpu", resident_layers=n_layers)
    if variant == "zero-copy":
        return TorusConfig(transport="zero-copy", device="cpu")
    if variant == "copy-stream":
        return TorusConfig(transport="copy", device="cpu", resident_layers=0, lookahead=2)
    raise ValueError(variant)


def generate_once(model: Any, inputs: dict[str, torch.Tensor], n: int, pad_id: int | None) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    if pad_id is not None:
        kw["pad_token_id"] = pad_id
    with torch.inference_mode():
        t_enter = time.perf_counter()
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **kw)
        t_exit = time.perf_counter()
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    t = clock.times
    if len(new) != n or len(t) != n:
        raise RuntimeError(f"expected {n} new tokens and {n} timestamps, got {len(new)} and {len(t)}")
    return {
        "tokens": new,
        "prefill_ms": (t[0] - t_enter) * 1e3,
        "decode_ms_per_token": (t[-1] - t[0]) * 1e3 / (n - 1),
        "total_ms": (t_exit - t_enter) * 1e3,
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation (>= 2; default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be >= 2 (decode time is measured between the first and last token)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    from transformers import AutoTokenizer

    from torus_adapters.default_model import default_model_path

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    models: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    configs: dict[str, dict[str, Any] | None] = {}
    attach_s: dict[str, float] = {}
    for v in VARIANTS:
        m = load_model(path)
        n_layers = len(m.model.layers)
        cfg = config_for(v, n_layers)
        configs[v] = (
            None
            if cfg is None
            else {k: getattr(cfg, k) for k in ("transport", "resident_layers", "lookahead", "device")}
        )
        if cfg is not None:
            t0 = time.perf_counter()
            engines[v] = tp.attach(m, cfg)
            attach_s[v] = time.perf_counter() - t0
        models[v] = m

    # Warm-up (untimed): first-call allocations, thread pools, the ring's first fill.
    for v in VARIANTS:
        generate_once(models[v], inputs, min(args.tokens, 16), pad_id)

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            eng = engines.get(v)
            if eng is not None:
                eng.reset_stats()
            gc.collect()
            res = generate_once(models[v], inputs, args.tokens, pad_id)
            res["round"] = r
            if eng is not None:
                st = eng.stats()
                res.update(
                    hits=st.hits,
                    misses=st.misses,
                    bytes_moved=st.bytes_moved,
                    stall_s=st.stall_s,
                    forward_passes=st.forward_passes,
                )
            runs[v].append(res)
            print(f"round {r + 1}/{args.repeats} {v:12s} {res['decode_ms_per_token']:7.2f} ms/token", file=sys.stderr)

    plain_tokens = runs["plain"][0]["tokens"]
    plain_by_round = {x["round"]: x["decode_ms_per_token"] for x in runs["plain"]}
    results: dict[str, Any] = {}
    for v in VARIANTS:
        rs = runs[v]
        ms = [x["decode_ms_per_token"] for x in rs]
        m = med(ms)
        ratios = [x["decode_ms_per_token"] / plain_by_round[x["round"]] for x in rs]
        ratio = med(ratios)
        eng = engines.get(v)
        streamed_accesses = sum(x.get("hits", 0) + x.get("misses", 0) for x in rs)
        passes = sum(x.get("forward_passes", 0) for x in rs)
        tokens_total = args.tokens * len(rs)
        entry: dict[str, Any] = {
            "config": configs[v],
            "decode_ms_per_token_median": m,
            "decode_ms_per_token_min": min(ms),
            "decode_ms_per_token_all": ms,
            "decode_tok_per_s_median": 1e3 / m,
            "spread": (max(ms) - min(ms)) / m,
            "prefill_ms_median": med([x["prefill_ms"] for x in rs]),
            "generate_total_ms_median": med([x["total_ms"] for x in rs]),
            "ratio_to_plain": ratio,
            "ratio_to_plain_all": ratios,
            "ratio_of_medians": m / med([x["decode_ms_per_token"] for x in runs["plain"]]),
            "tokens_equal_plain": all(x["tokens"] == plain_tokens for x in rs),
            "bytes_moved_per_token": (sum(x.get("bytes_moved", 0) for x in rs) / passes) if passes else 0.0,
            "forward_passes_per_run": (passes / len(rs)) if eng is not None else None,
            "hit_rate": (sum(x.get("hits", 0) for x in rs) / streamed_accesses) if streamed_accesses else None,
            "misses_total": sum(x.get("misses", 0) for x in rs) if eng is not None else None,
            "stall_ms_per_token": (sum(x.get("stall_s", 0.0) for x in rs) * 1e3 / tokens_total)
            if eng is not None
            else None,
            "attach_s": attach_s.get(v),
        }
        if eng is not None:
            st = eng.stats()
            entry["engine"] = {
                k: getattr(st, k)
                for k in (
                    "transport",
                    "resident_layers",
                    "streamed_layers",
                    "resident_bytes",
                    "streamed_bytes_per_pass",
                    "non_ffn_bytes",
                    "ring_bytes",
                    "host_store_bytes",
                )
            }
        if v in TARGETED:
            entry["target"] = f"ratio_to_plain <= {TARGET_RATIO}"
            entry["target_pass"] = ratio <= TARGET_RATIO
        else:
            entry["target"] = None
            entry["target_pass"] = None
        results[v] = entry

    for v in engines:
        tp.detach(models[v])

    elapsed = time.perf_counter() - t_start
    import transformers

    report = {
        "benchmark": "cpu_decode",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torus_sparse": tp.__version__,
        },
        "model": {"path": str(path), "dtype": "float32", "ffn_layers": len(models["plain"].model.layers)},
        "settings": {
            "tokens": args.tokens,
            "decode_steps_timed": args.tokens - 1,
            "repeats": args.repeats,
            "threads": threads,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "messages": MESSAGES,
            "greedy": True,
            "min_new_tokens": args.tokens,
        },
        "method": (
            "decode ms/token = (t[N-1]-t[0])/(N-1) from a timestamping LogitsProcessor (called once per new "
            "token after its forward pass); medians over interleaved, rotated rounds; ratio = median of per-round "
            "variant/plain"
        ),
        "target": f"resident and zero-copy decode ms/token <= {TARGET_RATIO} x plain",
        "variants": results,
        "wall_s": elapsed,
        # Other processes on the same cores inflate and scatter the numbers; the load average
        # (1, 5, 15 min) before and after the run says whether the machine was quiet.
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return 0


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    t = Table(
        title=f"CPU decode, SmolLM2-135M fp32, {s['tokens']} tokens ({s['decode_steps_timed']} decode steps timed), "
        f"{s['repeats']} rounds, {s['threads']} threads"
    )
    for col in (
        "variant",
        "ms/token",
        "min",
        "tok/s",
        "spread",
        "prefill ms",
        "ratio",
        "bytes/token",
        "hit rate",
        "stall ms/tok",
        "tokens = plain",
        "target ≤1.03",
    ):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v, e in report["variants"].items():
        hit = "n/a" if e["hit_rate"] is None else f"{e['hit_rate']:.1%}"
        stall = "-" if e["stall_ms_per_token"] is None else f"{e['stall_ms_per_token']:.2f}"
        verdict = "-" if e["target_pass"] is None else ("PASS" if e["target_pass"] else "FAIL")
        t.add_row(
            v,
            f"{e['decode_ms_per_token_median']:.2f}",
            f"{e['decode_ms_per_token_min']:.2f}",
            f"{e['decode_tok_per_s_median']:.1f}",
            f"{e['spread']:.1%}",
            f"{e['prefill_ms_median']:.1f}",
            f"{e['ratio_to_plain']:.3f}",
            f"{e['bytes_moved_per_token'] / 2**20:.1f} MiB",
            hit,
            stall,
            "yes" if e["tokens_equal_plain"] else "NO",
            verdict,
        )
    Console(width=200).print(t)
    print(
        f"load average before {report['loadavg_before']}, after {report['loadavg_after']} "
        f"(cpus: {report['host']['cpus']})"
    )


if __name__ == "__main__":
    sys.exit(main())
