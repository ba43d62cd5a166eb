"""Constrained decoding: which library, and what it costs per token on `torus-sparse serve`.

Part 1 — the libraries (xgrammar, llguidance, outlines-core through outlines' own vocabulary
adapter), on the embedded SmolLM2's tokenizer, no model: for each schema of a coverage set, does
it compile, how long does compiling take, and how long does computing one token mask take (mean
over the tokens of a valid instance, replayed token by token: mask, then consume). The install
weight of each is the size on disk of the distributions it adds to this project's environment
(the dependency closures below were read from `pip install --dry-run --report`; a distribution
not installed here is reported by its wheel's size where it was measured).

Part 2 — the server: decode tok/s of the real server on the embedded model (every FFN layer
streaming through the copy ring) with free requests, `response_format: json_schema` and a forced
tool call (`tool_choice: required`), at 1 and 8 concurrent requests, all in the same run. Every
request generates exactly `--tokens` tokens (the schema and the tool's parameters need a long
string, so no grammar completes early; free requests have the end-of-turn token banned), so the
rates compare per token. decode tok/s = rows decoded / time inside the scheduler's decode steps
that ran the cell's whole batch (the forward pass plus each row's choice, grammar masks
included; prefill, HTTP, and the steps while requests were still joining or already leaving
left out: those ran a smaller batch).

On a shared machine a decode step's time drifts by +-15% over seconds (memory bandwidth, the
host), far more than a grammar costs, so the cells are measured in mirrored rounds: at one batch
size a round runs the three scenarios back to back and then again in the reverse order (A B C C
B A, the first one rotated from round to round), so a drift that is linear over the round weighs
on every scenario alike. A round's overhead is 1 - constrained / free, each the rows decoded over
the seconds of its two runs; a cell's overhead is the median over `--repeats` rounds, reported
with its spread (min, max, quartiles) and the per-run tok/s spread.

Run:  python benchmarks/constrained_decode.py [--tokens 32] [--repeats 4] [--record | --out PATH]
(about 5 minutes on 2 CPU cores with the defaults)
Writes benchmarks/results/scratch/constrained_decode.json (with --record:
benchmarks/results/constrained_decode.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import threading
import time
from typing import Any, Callable

import harness  # sets the offline defaults (HF_HUB_OFFLINE=1) before transformers loads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: What each library adds to this project's environment (pip's dry-run report against it).
CLOSURES = {
    "llguidance": ["llguidance"],
    "xgrammar": ["xgrammar", "apache-tvm-ffi", "triton"],
    "outlines": [
        "outlines",
        "outlines_core",
        "cloudpickle",
        "diskcache",
        "genson",
        "jsonschema",
        "jsonschema-specifications",
        "referencing",
        "rpds-py",
    ],
}
#: Wheel sizes measured with `pip download --no-deps` for distributions not installed here.
WHEEL_BYTES = {"triton": 285_777_556}  # triton 3.9.0, cp311 manylinux x86_64

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
#: name -> (schema, a valid instance)
COVERAGE: dict[str, tuple[dict[str, Any], Any]] = {
    "flat object": (PERSON, {"name": "Ada", "age": 36}),
    "enum + const": (
        {
            "type": "object",
            "properties": {"role": {"enum": ["admin", "user"]}, "v": {"const": 1}},
            "required": ["role", "v"],
        },
        {"role": "admin", "v": 1},
    ),
    "integer bounds": (
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 97}}, "required": ["n"]},
        {"n": 42},
    ),
    "string length + pattern": (
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                "s": {"type": "string", "maxLength": 8},
            },
            "required": ["code", "s"],
        },
        {"code": "ABC-12", "s": "hello"},
    ),
    "array min/max items": (
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}},
            "required": ["tags"],
        },
        {"tags": ["a", "b", "c"]},
    ),
    "nested objects": (
        {
            "type": "object",
            "properties": {
                "user": PERSON,
                "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
            "required": ["user", "address"],
        },
        {"user": {"name": "Bo", "age": 3}, "address": {"city": "Oslo"}},
    ),
    "anyOf": (
        {
            "type": "object",
            "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
            "required": ["v"],
        },
        {"v": "x"},
    ),
    "$defs / $ref (pydantic)": (
        {
            "$defs": {"Pet": {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}},
            "type": "object",
            "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}},
            "required": ["pets"],
        },
        {"pets": [{"kind": "cat"}]},
    ),
    "recursive $ref": (
        {
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                    },
                    "required": ["v", "kids"],
                }
            },
            "$ref": "#/$defs/Node",
        },
        {"v": 1, "kids": [{"v": 2, "kids": []}]},
    ),
    "format date-time": (
        {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}, "required": ["at"]},
        {"at": "2024-05-01T12:30:00Z"},
    ),
    "any JSON object": ({"type": "object"}, {"a": [1, 2, {"b": None}], "c": "d"}),
}


# ---------------------------------------------------------------------- part 1: the libraries
class _Lib:
    """One library's compile / mask / consume, behind the same three calls."""

    name: str

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def start(self, compiled: Any) -> Any: ...
    def mask(self, state: Any) -> None: ...
    def consume(self, state: Any, token: int) -> bool: ...


class _LLGuidance(_Lib):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        from torus_adapters.server.constraints import JSON_LAYOUT

        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error.splitlines()[0])
        return grammar

    def start(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def mask(self, state):
        self.lt.fill_next_token_bitmask(state, self.bitmask, 0)

    def consume(self, state, token):
        return state.consume_token(token)


class _XGrammar(_Lib):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, state):
        state.fill_next_token_bitmask(self.bitmask)

    def consume(self, state, token):
        return state.accept_token(token)


class _Outlines(_Lib):
    name = "outlines"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        from outlines.backends.outlines_core import OutlinesCoreBackend
        from outlines.models.transformers import TransformerTokenizer
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

        adapter = TransformerTokenizer(tokenizer)
        self.vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
            tokenizer.get_vocab(), tokenizer.eos_token_id, tokenizer.eos_token, adapter.convert_token_to_string
        )
        self.Guide, self.Index, self.regex_of = Guide, Index, build_regex_from_schema
        self.fill = fill_next_token_bitmask
        self.bitmask = allocate_token_bitmask(vocab)

    def compile(self, schema):
        return self.Index(self.regex_of(json.dumps(schema), r"[ ]?"), self.vocabulary)

    def start(self, compiled):
        return self.Guide(compiled)

    def mask(self, state):
        self.fill(state, self.bitmask)

    def consume(self, state, token):
        state.advance(token)
        return True


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def install_bytes(lib: str) -> dict[str, Any]:
    """Bytes on disk of the distributions `lib` adds (installed ones measured, others by wheel size)."""
    sizes: dict[str, int | None] = {}
    for dist in CLOSURES[lib]:
        try:
            files = md.distribution(dist).files or []
            sizes[dist] = sum((f.size or 0) for f in files)
        except md.PackageNotFoundError:
            sizes[dist] = WHEEL_BYTES.get(dist)
    return {"total_bytes": sum(v or 0 for v in sizes.values()), "distributions": sizes}


def compare_libraries(tokenizer: Any, vocab: int) -> list[dict[str, Any]]:
    rows = []
    for make in (_LLGuidance, _XGrammar, _Outlines):
        row: dict[str, Any] = {"library": make.name, "version": harness.package_version(make.name)}
        try:
            lib, row["tokenizer_setup_s"] = _timed(lambda: make(tokenizer, vocab))  # noqa: B023
        except Exception as exc:  # not installed, or cannot run here
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300], **install_bytes(make.name)})
            continue
        schemas, masks = {}, []
        for name, (schema, instance) in COVERAGE.items():
            text = json.dumps(instance)
            ids = tokenizer.encode(text, add_special_tokens=False)
            entry: dict[str, Any] = {}
            try:
                compiled, entry["compile_s"] = _timed(lambda: lib.compile(schema))  # noqa: B023
                state = lib.start(compiled)
                times = []
                for token in ids:
                    _, dt = _timed(lambda: lib.mask(state))  # noqa: B023
                    times.append(dt)
                    if not lib.consume(state, token):
                        raise ValueError(f"refused a token of the valid instance {text!r}")
                entry["mask_ms_per_token"] = 1000 * statistics.mean(times)
                entry["ok"] = True
                masks.extend(times)
            except Exception as exc:
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
            schemas[name] = entry
        row.update(
            schemas=schemas,
            compiled=sum(e["ok"] for e in schemas.values()),
            of=len(COVERAGE),
            mask_ms_per_token_mean=1000 * statistics.mean(masks) if masks else None,
            compile_s_max=max((e.get("compile_s", 0) for e in schemas.values()), default=None),
            **install_bytes(make.name),
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- part 2: the server
LONG_TEXT = {"type": "string", "minLength": 400}
SCENARIOS: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "story",
                "schema": {
                    "type": "object",
                    "properties": {"title": {"type": "string"}, "story": LONG_TEXT},
                    "required": ["title", "story"],
                },
            },
        }
    },
    "tool call": {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "save_note",
                    "description": "Save a long note",
                    "parameters": {"type": "object", "properties": {"text": LONG_TEXT}, "required": ["text"]},
                },
            }
        ],
        "tool_choice": "required",
    },
}
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe a day at the market.",
    "Tell me about the history of bread.",
    "Explain how rain forms.",
    "Write a note about a trip to the mountains.",
    "Describe your favourite city.",
    "Tell a story about a robot learning to paint.",
    "Explain why the sky is blue.",
]


class StepTimer:
    """Times the scheduler's decode steps (the model's forward pass and the per-row choice, masks
    included), so prefill and HTTP are left out; keeps (start, rows, seconds) per step."""

    def __init__(self, scheduler: Any) -> None:
        self.steps: list[tuple[float, int, float]] = []
        step = scheduler._decode_step

        def timed() -> None:
            rows = len(scheduler._active)
            t0 = time.perf_counter()
            step()
            self.steps.append((t0, rows, time.perf_counter() - t0))

        scheduler._decode_step = timed

    def take(self, since: float) -> list[tuple[int, float]]:
        """(rows, seconds) of the steps that started after `since` (a run's last step delivers its
        replies before it is recorded, so it may land after the next run began: it is not that run's)."""
        out, self.steps = self.steps, []
        return [(rows, sec) for t0, rows, sec in out if t0 >= since]


def run_scenario(url: str, timer: StepTimer, name: str, batch: int, tokens: int) -> dict[str, Any]:
    """`batch` concurrent requests of scenario `name`; decode tok/s over the steps that ran all of them."""
    import requests

    barrier = threading.Barrier(batch)
    counts = [0] * batch

    def client(i: int) -> None:
        body = {
            "model": "x",
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            # free replies may end early: ban the end-of-turn token so every request makes `tokens`
            **({"logit_bias": {"2": -100}} if name == "free" else {}),
            **SCENARIOS[name],
        }
        barrier.wait()
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        counts[i] = r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = timer.take(since=start)
    full = [sec for rows, sec in steps if rows == batch]
    return {
        "tokens": counts,
        "rows": batch * len(full),
        "seconds": sum(full),
        "decode_tok_s": batch * len(full) / sum(full) if full else None,
        "full_steps": len(full),
        "steps": len(steps),
        "step_ms_median": 1000 * statistics.median(full) if full else None,
    }


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of `values`."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3}


def measure_server(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from torus_adapters.server import ServerSettings, create_app
    from torus_plugins import TorusConfig, TorusModel

    tm = TorusModel.from_pretrained(None, TorusConfig(transport="copy", resident_layers=0), show_progress=False)
    app = create_app(tm, ServerSettings(model_name="smollm2", max_batch_size=8))
    server = harness.Server(app)
    names = list(SCENARIOS)
    runs: dict[tuple[str, int], list[list[dict[str, Any]]]] = {(n, b): [] for b in (1, 8) for n in names}
    try:
        timer = StepTimer(app.state.service.scheduler)
        for name in names:  # warm-up: the grammar tokenizer, each route, both batch sizes
            run_scenario(server.url, timer, name, 1, 4)
            run_scenario(server.url, timer, name, 8, 4)
        for r in range(args.repeats):
            for batch in (1, 8):  # a mirrored round at one batch size: A B C C B A
                order = harness.rotated(names, r)
                for name in names:
                    runs[(name, batch)].append([])
                for name in order + order[::-1]:
                    harness.log(f"round {r + 1}/{args.repeats}: {name} at batch {batch}")
                    runs[(name, batch)][-1].append(run_scenario(server.url, timer, name, batch, args.tokens))
    finally:
        server.stop()

    def rate(pair: list[dict[str, Any]]) -> float:  # rows decoded over the seconds of the round's runs
        return sum(run["rows"] for run in pair) / sum(run["seconds"] for run in pair)

    rows = []
    for batch in (1, 8):
        free = [rate(pair) for pair in runs[("free", batch)]]
        for name in names:
            rounds = [rate(pair) for pair in runs[(name, batch)]]
            per_run = [run["decode_tok_s"] for pair in runs[(name, batch)] for run in pair]
            overheads = [1 - c / f for c, f in zip(rounds, free)]
            over = spread(overheads)
            rows.append(
                {
                    "scenario": name,
                    "batch": batch,
                    "decode_tok_s": statistics.median(rounds),
                    "decode_tok_s_runs": spread(per_run),
                    "rounds": rounds,
                    "runs": per_run,
                    "overhead_per_token": over["median"],
                    "overhead_spread": over,
                    "overhead_rounds": overheads,
                    "overhead_of_medians": 1 - statistics.median(rounds) / statistics.median(free),
                    "vs_free": 1 - over["median"],
                    "step_ms_median": statistics.median(
                        run["step_ms_median"] for pair in runs[(name, batch)] for run in pair
                    ),
                    "full_batch_steps": [f"{run['full_steps']}/{run['steps']}" for run in runs[(name, batch)][0]],
                    "tokens_per_request": runs[(name, batch)][-1][-1]["tokens"],
                }
            )
    s = tm.stats()
    return rows, {"transport": s.transport, "resident_layers": s.resident_layers, "streamed_layers": s.streamed_layers}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens every request generates (default 32)")
    ap.add_argument("--repeats", type=int, default=4, help="mirrored rounds per batch size (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    ap.add_argument("--skip-server", action="store_true", help="only compare the libraries")
    harness.add_output_args(ap, "constrained_decode.json")
    return ap.parse_args(argv)


def render(report: dict[str, Any]) -> list[Any]:
    libs = harness.table(
        "Constrained-decoding libraries on SmolLM2's tokenizer (49,152 tokens)",
        [
            "library",
            "version",
            "schemas compiled",
            "mask ms/token",
            "slowest compile s",
            "tokenizer setup s",
            "adds to install",
        ],
    )
    for row in report["libraries"]:
        libs.add_row(
            row["library"],
            str(row.get("version")),
            f"{row.get('compiled', 0)}/{row.get('of', len(COVERAGE))}",
            f"{row['mask_ms_per_token_mean']:.3f}" if row.get("mask_ms_per_token_mean") is not None else "-",
            f"{row['compile_s_max']:.3f}" if row.get("compile_s_max") is not None else "-",
            f"{row['tokenizer_setup_s']:.2f}" if "tokenizer_setup_s" in row else "-",
            harness.fmt_bytes(row["total_bytes"]),
        )
    out = [libs]
    if report.get("server"):
        srv = harness.table(
            "torus-sparse serve, decode tok/s (llguidance); overhead: median of mirrored rounds",
            ["scenario", "batch", "tok/s", "tok/s runs min-max", "overhead/token", "overhead min-max", "overhead IQR"],
        )
        for row in report["server"]:
            tok, over = row["decode_tok_s_runs"], row["overhead_spread"]
            srv.add_row(
                row["scenario"],
                str(row["batch"]),
                f"{row['decode_tok_s']:.2f}",
                f"{tok['min']:.2f}-{tok['max']:.2f}",
                f"{100 * row['overhead_per_token']:.1f}%",
                f"{100 * over['min']:.1f}% to {100 * over['max']:.1f}%",
                f"{100 * over['q1']:.1f}% to {100 * over['q3']:.1f}%",
            )
        out.append(srv)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, "constrained_decode.json", threads=args.threads)
    import transformers

    from torus_adapters import default_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_path()))
    harness.log("comparing the libraries")
    report: dict[str, Any] = {
        "benchmark": "constrained_decode",
        **harness.environment(device="cpu"),
        "coverage": {name: schema for name, (schema, _) in COVERAGE.items()},
        "libraries": compare_libraries(tokenizer, len(tokenizer)),
    }
    run.save(report)
    if not args.skip_server:
        harness.log("measuring the server")
        rows, engine = measure_server(args)
        report.update(
            server=rows,
            engine=engine,
            settings={
                "tokens": args.tokens,
                "repeats": args.repeats,
                "batches": [1, 8],
                "route": "POST /v1/chat/completions (greedy)",
            },
            method="decode tok/s = rows decoded / seconds inside the scheduler's decode steps that ran the cell's "
            "whole batch (forward pass and per-row choice, grammar masks included); mirrored rounds: at one batch "
            "size a round runs free, json_schema and tool call back to back and again in reverse order (A B C C B A, "
            "rotated per round); a round's overhead is 1 - constrained / free over its two runs each; a cell's "
            "overhead is the median over rounds (spread: min, max, quartiles; runs: each run's tok/s); "
            "overhead_of_medians = 1 - median tok/s / median free tok/s",
            target={"overhead_per_token_at_most": 0.10},
        )
        worst = max(r["overhead_per_token"] for r in rows)
        report["verdict"] = harness.pass_fail(worst <= 0.10)
    run.save(report)
    harness.show(*render(report))
    if "verdict" in report:
        print(f"largest constrained overhead per token: {100 * worst:.1f}% (target at most 10%): {report['verdict']}")
    print(f"\nwrote {run.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
