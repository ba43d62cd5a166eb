"""`torus-sparse bench`: one model, one prompt, three ways to run it, measured the same way.

Variants, all loaded from the same checkpoint and decoding the same greedy tokens:

    baseline     the plain model, fully on the device (skipped on CUDA when it exceeds the budget)
    torus …      torus-sparse at the budget, one variant per lookahead × weight quantization
    accelerate   accelerate offload at the same budget: on CUDA `device_map="auto"` with
                 `max_memory={gpu: budget, "cpu": host RAM}`; on a CPU-only machine
                 `accelerate.cpu_offload(model, execution_device=cpu)` (weights in a CPU state dict,
                 bound to each module per forward by accelerate's hooks)

Timing (`timed_generate`): a logits processor records `perf_counter()` once per new token, right
after the forward pass that produced it (on CUDA it first synchronises the compute stream only,
so the engine's copy stream keeps running). Token 0 follows the prefill, so
TTFT = t[0] − entry into `generate()`, prefill tok/s = prompt tokens / TTFT, and
decode tok/s = (N − 1) / (t[N−1] − t[0]) over the N − 1 decode steps. `min_new_tokens =
max_new_tokens = N`, so every variant decodes the same count. Each variant gets one untimed
warm-up, then `repeats` timed runs; the run with the (lower) median decode tok/s is reported.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from torus_plugins import BudgetTooSmallError, ConfigError, TorusConfig, attach, detach
from torus_plugins.config import format_bytes, parse_bandwidth, parse_bytes
from torus_plugins.engine import resolve_device

from .bench_report import (
    BenchReport,
    Run,
    VariantResult,
    apply_ceiling,
    compare_texts,
    render_table,
    summarize,
    write_chart,
    write_json,
)

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue, then give one everyday example."
WARMUP_TOKENS = 4
QUANT_NAMES = {"none": None, "int8": "int8", "int4": "int4"}


# ---------------------------------------------------------------------- settings and variants
@dataclass(frozen=True)
class BenchSettings:
    """What to run. `vram=None`: on CUDA 90% of free device memory; on the CPU the smallest budget
    that streams every FFN layer (so there is something to measure)."""

    model: str | None = None
    vram: int | str | None = None
    tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    lookaheads: tuple[int, ...] = (2,)
    weight_quants: tuple[str | None, ...] = (None,)
    quant_group_size: int = TorusConfig.quant_group_size
    transport: str = "auto"
    link_bandwidth: str | float | None = None
    repeats: int = 3
    out: Path | None = None
    accelerate: bool = True
    baseline: bool = True
    device: str | None = None
    dtype: str | None = None
    kv_reserve_tokens: int = 4096
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or self.tokens < 2:
            raise ConfigError(f"--tokens must be an integer >= 2 (decode is timed between tokens), got {self.tokens!r}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"--repeats must be an integer >= 1, got {self.repeats!r}")
        if not self.lookaheads or any(not isinstance(k, int) or k < 1 for k in self.lookaheads):
            raise ConfigError(f"--lookahead takes integers >= 1, got {list(self.lookaheads)!r}")
        if not self.weight_quants or any(q not in (None, "int8", "int4") for q in self.weight_quants):
            raise ConfigError(f"--weight-quant takes none, int8 or int4, got {list(self.weight_quants)!r}")
        g = self.quant_group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
            raise ConfigError(f"--quant-group-size must be an even integer >= 2, got {g!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be an integer >= 1, got {self.threads!r}")
        if not self.prompt.strip():
            raise ConfigError("--prompt must not be empty")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    kind: str  # "baseline", "torus" or "accelerate"
    lookahead: int | None = None
    weight_quant: str | None = None


def variant_specs(s: BenchSettings) -> list[VariantSpec]:
    """The variants in run order: baseline, every lookahead × quantization, accelerate."""
    specs = [VariantSpec("baseline", "baseline")] if s.baseline else []
    for q in dict.fromkeys(s.weight_quants):
        for k in dict.fromkeys(s.lookaheads):
            specs.append(VariantSpec(f"torus la={k}" + (f" {q}" if q else ""), "torus", k, q))
    if s.accelerate:
        specs.append(VariantSpec("accelerate", "accelerate"))
    return specs


@dataclass
class Env:
    """Everything resolved once before any variant runs."""

    device: torch.device
    source: str
    source_extra: dict[str, Any]
    model_name: str
    dtype: Any
    transport: str
    options: dict[str, Any]
    bandwidth_bps: float
    bandwidth_source: str
    budget_bytes: int
    budget_source: str


def resolve_dtype(name: str | None) -> Any:
    if name is None:
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"--dtype {name!r} is not a torch dtype (try float32, bfloat16, float16)")
    return dtype


def resolve_transport(requested: str, device: torch.device, link_given: bool) -> str:
    """`auto`: cuda on a GPU; on the CPU `simulated-link` when a link bandwidth is given, else `copy`."""
    from torus_plugins.plugins import resolve

    name = requested
    if requested == "auto":
        name = "cuda" if device.type == "cuda" else ("simulated-link" if link_given else "copy")
    known = resolve().transports
    if name not in known:
        raise ConfigError(f"unknown transport {name!r}; available: {', '.join(sorted(known))}")
    if name == "zero-copy":
        raise ConfigError("transport 'zero-copy' never moves bytes, so it has no link to benchmark; use copy or cuda")
    return name


def resolve_bandwidth(link_bandwidth: str | float | None, device: torch.device) -> tuple[float, str]:
    from torus_plugins.bandwidth import probe_bandwidth

    if link_bandwidth is not None:
        return parse_bandwidth(link_bandwidth, "--link-bandwidth"), "given (--link-bandwidth)"
    kind = "pinned host→device copy" if device.type == "cuda" else "host memcpy"
    return probe_bandwidth(device), f"probed ({kind}, best of 5)"


def torus_config(s: BenchSettings, env: Env, spec: VariantSpec, budget: int | None = None) -> TorusConfig:
    return TorusConfig(
        vram_budget=env.budget_bytes if budget is None else budget,
        lookahead=spec.lookahead or 1,
        device=str(env.device),
        transport=env.transport,
        weight_quant=spec.weight_quant,
        quant_group_size=s.quant_group_size,
        kv_reserve_tokens=s.kv_reserve_tokens,
        options=dict(env.options),
    )


def plan_for(s: BenchSettings, env: Env, config: TorusConfig, **changes: Any):
    from ..transformers_adapter.planning import plan_model

    return plan_model(
        s.model, config.replace(**changes) if changes else config, env.bandwidth_bps, str(env.device), s.dtype
    )


def resolve_budget(s: BenchSettings, env: Env, specs: list[VariantSpec]) -> tuple[int, str]:
    if s.vram is not None:
        return parse_bytes(s.vram, "--vram-budget"), "given (--vram-budget)"
    if env.device.type == "cuda":
        return int(torch.cuda.mem_get_info(env.device)[0] * 0.9), "90% of free device memory"
    # The largest lookahead has the largest ring, so one plan per quantization is enough.
    need, la = 0, max(s.lookaheads)
    for q in dict.fromkeys(x.weight_quant for x in specs if x.kind == "torus"):
        cfg = torus_config(s, env, VariantSpec("", "torus", la, q), budget=0)
        p = plan_for(s, env, cfg, vram_budget=None, resident_layers=0)
        need = max(need, p.device_bytes + p.kv_reserve_bytes)
    return need, "default on the CPU: the smallest budget that streams every FFN layer"


def check_plans(s: BenchSettings, env: Env, specs: list[VariantSpec]) -> dict[str, Any]:
    """Plan every torus variant at the budget; a variant that does not fit is the user's error."""
    plans = {}
    for spec in (x for x in specs if x.kind == "torus"):
        plan = plan_for(s, env, torus_config(s, env, spec))
        if not plan.fits:
            raise BudgetTooSmallError(f"{spec.name}: {plan.reason}", plan.minimum_budget_bytes or 0)
        plans[spec.name] = plan
    return plans


# ---------------------------------------------------------------------- timing
class StepClock:
    """Logits processor: per new token, wait for the compute stream, take the time, report it."""

    def __init__(self, device: torch.device, on_token: Callable[[int], None] | None = None) -> None:
        self.times: list[float] = []
        self.on_token = on_token
        self._sync = torch.cuda.current_stream(device).synchronize if device.type == "cuda" else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._sync is not None:
            self._sync()
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(len(self.times))
        return scores


def timed_generate(
    model: Any,
    inputs: dict[str, torch.Tensor],
    n: int,
    device: torch.device,
    pad_id: int | None,
    on_token: Callable[[int], None] | None = None,
) -> Run:
    """Greedy-decode exactly `n` new tokens and time them (see the module docstring)."""
    from transformers import LogitsProcessorList

    clock = StepClock(device, on_token)
    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    if pad_id is not None:
        kw["pad_token_id"] = pad_id
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        t_enter = time.perf_counter()
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **kw)
        sync()
        t_exit = time.perf_counter()
    prompt = int(inputs["input_ids"].shape[1])
    new, t = out[0, prompt:].tolist(), clock.times
    if len(new) != n or len(t) != n:
        raise RuntimeError(f"expected {n} new tokens and timestamps, got {len(new)} and {len(t)}")
    return Run(new, prompt, t[0] - t_enter, t[-1] - t[0], t_exit - t_enter)


def engine_counters(engine: Any) -> dict[str, Any]:
    st = engine.stats()
    keys = ("hits", "misses", "bytes_moved", "stall_s", "forward_passes", "streamed_bytes_per_pass")
    return {k: getattr(st, k) for k in keys}


# ---------------------------------------------------------------------- running the variants
class Reporter:
    """Live progress on stderr: a rich progress display on a terminal, plain lines elsewhere."""

    def __init__(self, total_runs: int, tokens: int, console: Any) -> None:
        self.console, self.tokens, self.total = console, tokens, total_runs
        self.done = 0
        self._bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            self._all = self._bar.add_task("bench", total=total_runs)
            self._run = self._bar.add_task("", total=tokens)
            self._bar.start()

    def note(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False)

    def start(self, label: str, n: int) -> Callable[[int], None]:
        if self._bar is None:
            return lambda i: None
        self._bar.update(self._run, description=label, completed=0, total=n)
        return lambda i: self._bar.update(self._run, completed=i)

    def finish(self, label: str, run: Run | None, counts: bool = True) -> None:
        if counts:
            self.done += 1
        if self._bar is not None:
            self._bar.update(self._all, completed=self.done)
        if run is not None and counts:
            self.note(
                f"[{self.done}/{self.total}] {label}: {run.decode_tok_s:.1f} tok/s decode, "
                f"TTFT {run.ttft_s * 1e3:.0f} ms"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def measure(
    name: str,
    model: Any,
    inputs: dict[str, torch.Tensor],
    s: BenchSettings,
    device: torch.device,
    pad_id: int | None,
    rep: Reporter,
    engine: Any = None,
) -> tuple[list[Run], int | None]:
    """One untimed warm-up, then `repeats` timed runs (engine counters reset before each).

    Returns the runs and, on CUDA, the peak allocated device memory over all of them and the
    warm-up (read before each engine reset, which also resets the peak)."""
    n = min(WARMUP_TOKENS, s.tokens)
    timed_generate(model, inputs, n, device, pad_id, rep.start(f"{name} warm-up", n))
    rep.finish(name, None, counts=False)
    runs, peaks = [], []
    for i in range(s.repeats):
        peaks.append(peak_device(device))
        if engine is not None:
            engine.reset_stats()
        gc.collect()
        label = f"{name} run {i + 1}/{s.repeats}"
        run = timed_generate(model, inputs, s.tokens, device, pad_id, rep.start(label, s.tokens))
        if engine is not None:
            run.engine = engine_counters(engine)
        runs.append(run)
        rep.finish(label, run)
    peaks.append(peak_device(device))
    return runs, None if device.type != "cuda" else max(peaks)


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_device(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def load_host_model(env: Env) -> Any:
    """The checkpoint in host memory; on the CPU copied out of the safetensors memory map so the
    plain model reads the same kind of memory as the engine's packed store."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env.source, dtype=env.dtype, **env.source_extra).eval()
    model.requires_grad_(False)
    if env.device.type == "cpu":
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def model_bytes(model: Any) -> int:
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen.setdefault(p.data_ptr(), p.numel() * p.element_size())
    return sum(seen.values())


def run_baseline(model: Any, inputs: Any, s: BenchSettings, env: Env, pad_id: Any, rep: Reporter) -> VariantResult:
    res = VariantResult("baseline", "baseline", method="the plain transformers model, every weight on the device")
    size = model_bytes(model)
    res.extra["model_bytes"] = size
    if size > env.budget_bytes:
        if env.device.type == "cuda":
            res.status = "skipped"
            res.reason = f"the model ({format_bytes(size)}) exceeds the budget ({format_bytes(env.budget_bytes)})"
            return res
        res.extra["over_budget"] = True  # the CPU has the memory: run it as the reference anyway
    free_device(env.device)
    t0 = time.perf_counter()
    model.to(env.device)
    res.extra["load_s"] = time.perf_counter() - t0
    try:
        runs, res.peak_device_bytes = measure("baseline", model, inputs, s, env.device, pad_id, rep)
        summarize(res, runs)
        res.bytes_per_token = 0.0
    finally:
        model.to("cpu")
    return res


def run_torus(
    model: Any, inputs: Any, s: BenchSettings, env: Env, pad_id: Any, rep: Reporter, spec: VariantSpec, plan: Any
) -> VariantResult:
    config = torus_config(s, env, spec)
    res = VariantResult(spec.name, "torus", lossy=spec.weight_quant is not None)
    res.method = f"torus_plugins.attach(model, TorusConfig(...)) on transport {env.transport!r}"
    res.config = {
        k: v
        for k, v in asdict(config).items()
        if k in ("vram_budget", "lookahead", "transport", "weight_quant", "kv_reserve_tokens", "options")
    }
    res.predicted_tok_s = plan.predicted_tok_s
    free_device(env.device)
    t0 = time.perf_counter()
    engine = attach(model, config)
    res.extra["load_s"] = time.perf_counter() - t0
    try:
        runs, peak = measure(spec.name, model, inputs, s, env.device, pad_id, rep, engine)
        summarize(res, runs)
        st = engine.stats()
        res.peak_device_bytes = st.peak_device_bytes if peak is None else peak
        res.extra["engine"] = {
            k: getattr(st, k)
            for k in ("resident_layers", "streamed_layers", "streamed_bytes_per_pass", "host_store_bytes")
        }
        res.extra["engine"]["ring_bytes"] = st.ring_bytes
        res.extra["plan"] = plan.as_dict()
        res.extra["plan_matches_engine"] = (
            tuple(plan.residency.resident) == tuple(engine.plan.resident)
            and plan.streamed_bytes_per_token == st.streamed_bytes_per_pass
        )
    finally:
        detach(model)
    return res


def offloaded_bytes(model: Any) -> int:
    """Bytes of the parameters accelerate keeps off the execution device (moved per forward)."""
    total = 0
    for name, where in getattr(model, "hf_device_map", {}).items():
        if where in ("cpu", "disk"):
            total += sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters())
    return total


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def run_accelerate(inputs: Any, s: BenchSettings, env: Env, pad_id: Any, rep: Reporter) -> VariantResult:
    from transformers import AutoModelForCausalLM

    res = VariantResult("accelerate", "accelerate")
    free_device(env.device)
    t0 = time.perf_counter()
    if env.device.type == "cuda":
        max_memory = {env.device.index: env.budget_bytes, "cpu": host_memory_bytes()}
        model = AutoModelForCausalLM.from_pretrained(
            env.source, dtype=env.dtype, device_map="auto", max_memory=max_memory, **env.source_extra
        ).eval()
        res.method = (
            f"AutoModelForCausalLM.from_pretrained(device_map='auto', max_memory={{{env.device.index}: budget, "
            f"'cpu': host RAM}}); modules placed on 'cpu' are copied to the GPU on every forward by accelerate's "
            f"AlignDevicesHook (synchronous, no prefetch). bytes/token = bytes of those modules' parameters."
        )
        res.bytes_per_token = float(offloaded_bytes(model))
        res.extra["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
    else:
        from accelerate import cpu_offload

        model = load_host_model(env)
        bound = model_bytes(model)
        cpu_offload(model, execution_device=torch.device("cpu"))
        res.method = (
            "accelerate.cpu_offload(model, execution_device=cpu): every weight stays in a CPU state dict and "
            "accelerate's AlignDevicesHook binds it to its module for each forward and unbinds it after. On the CPU "
            "that `.to('cpu')` is a no-op, so nothing is copied, no link bounds it and the budget does not constrain "
            "it; bytes/token is left empty and `weights_bound_per_forward_bytes` says how much it rebinds."
        )
        res.extra["weights_bound_per_forward_bytes"] = bound
    res.extra["load_s"] = time.perf_counter() - t0
    try:
        runs, res.peak_device_bytes = measure("accelerate", model, inputs, s, env.device, pad_id, rep)
        summarize(res, runs)
    finally:
        del model
        free_device(env.device)
    return res


def default_out() -> Path:
    return Path.cwd() / "results" / f"bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def header(s: BenchSettings, env: Env, prompt_tokens: int) -> dict[str, Any]:
    import transformers

    import torus_plugins

    dev_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else f"cpu ({platform.machine()})"
    return {
        "benchmark": "torus-sparse bench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev_name,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": _version("accelerate"),
            "torus_sparse": torus_plugins.__version__,
        },
        "model": {"name": env.model_name, "source": env.source, "dtype": str(env.dtype)},
        "settings": {
            "tokens": s.tokens,
            "decode_steps_timed": s.tokens - 1,
            "repeats": s.repeats,
            "warmup_tokens": min(WARMUP_TOKENS, s.tokens),
            "prompt": s.prompt,
            "prompt_tokens": prompt_tokens,
            "budget_bytes": env.budget_bytes,
            "budget_source": env.budget_source,
            "bandwidth_bps": env.bandwidth_bps,
            "bandwidth_source": env.bandwidth_source,
            "transport": env.transport,
            "transport_options": env.options,
            "lookaheads": list(s.lookaheads),
            "weight_quants": [q or "none" for q in s.weight_quants],
            "quant_group_size": s.quant_group_size,
            "kv_reserve_tokens": s.kv_reserve_tokens,
            "torch_threads": torch.get_num_threads(),
            "greedy": True,
        },
        "method": {
            "timing": "a LogitsProcessor records perf_counter once per new token after its forward pass (CUDA: after "
            "synchronising the compute stream only); TTFT = t[0] - entry into generate(); prefill tok/s = prompt "
            "tokens / TTFT; decode tok/s = (N-1)/(t[N-1]-t[0]); min_new_tokens = max_new_tokens = N",
            "repeats": "one untimed warm-up per variant, then `repeats` timed runs; the lower-median run's decode "
            "tok/s, the median TTFT and prefill tok/s are reported; variants run one after another",
            "bytes_per_token": "torus: engine bytes_moved / new tokens (counters reset before each run); "
            "accelerate: parameter bytes it keeps off the device (moved every forward); baseline: 0",
            "link_ceiling": "bandwidth / bytes_per_token; pct_of_ceiling = decode tok/s / ceiling",
            "predicted_tok_s": "torus-sparse plan (plan_model) for the same config and bandwidth: bandwidth / "
            "planned streamed bytes per token",
            "text_equal": "generated token ids equal to the reference variant's (the baseline when it ran); "
            "quantized variants are lossy, so inequality is expected",
            "peak_device_bytes": "CUDA: torch.cuda.max_memory_allocated over loading/attach, warm-up and runs "
            "(reset before the variant loads); "
            "CPU: the engine's placed bytes for torus, none for the others",
        },
        "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - informational only
        return None


def contention_warning(device: torch.device) -> str | None:
    """On a CPU shared with other busy processes, multi-threaded torch steps wait for descheduled
    workers (here: 200 ms forwards became 4 s); say so rather than let the numbers mislead."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cpus, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load > cpus - threads + 0.5:
        return (
            f"load average {load:.1f} on {cpus} CPUs: other processes compete with the {threads} torch threads, "
            f"which can slow steps by orders of magnitude and favour or penalise any variant at random; "
            f"use a quiet machine or --threads 1"
        )
    return None


def encode_prompt(tokenizer: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The prompt as a user turn when the tokenizer has a chat template, else as raw text."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}


def prepare(s: BenchSettings, specs: list[VariantSpec]) -> tuple[Env, dict[str, Any]]:
    """Resolve device, transport, bandwidth and budget, and plan every torus variant (no weights read)."""
    from ..transformers_adapter import resolve_model_source

    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype)
    source, extra = resolve_model_source(s.model)
    transport = resolve_transport(s.transport, device, s.link_bandwidth is not None)
    bps, bw_source = resolve_bandwidth(s.link_bandwidth, device)
    options = {"link_bandwidth": bps} if transport == "simulated-link" else {}
    name = s.model or "SmolLM2-135M-Instruct (embedded default)"
    env = Env(device, source, extra, name, dtype, transport, options, bps, bw_source, 0, "")
    env.budget_bytes, env.budget_source = resolve_budget(s, env, specs)
    return env, check_plans(s, env, specs)


def run_bench(s: BenchSettings, console: Any = None, err_console: Any = None) -> BenchReport:
    """Run every variant, print the table, write `bench.json` and `bench.png` under the results folder."""
    from rich.console import Console
    from transformers import AutoTokenizer

    if console is None:  # the table needs about 125 columns: wider than that, never cut cells
        console = Console()
        console = Console(width=max(console.width if console.is_terminal else 0, 130))
    err = err_console or Console(stderr=True)
    t_start = time.perf_counter()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    specs = variant_specs(s)
    env, plans = prepare(s, specs)
    out_dir = Path(s.out) if s.out else default_out()
    json_path = out_dir / "bench.json"
    err.print(
        f"bench: {env.model_name} on {env.device}, budget {format_bytes(env.budget_bytes)} ({env.budget_source}), "
        f"link {env.bandwidth_bps / 1e9:.1f} GB/s ({env.bandwidth_source}), transport {env.transport}",
        highlight=False,
        markup=False,
    )
    warning = contention_warning(env.device)
    if warning:
        err.print(f"warning: {warning}", highlight=False, markup=False)
    tokenizer = AutoTokenizer.from_pretrained(env.source, **env.source_extra)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = encode_prompt(tokenizer, s.prompt, env.device)
    report = BenchReport(header(s, env, int(inputs["input_ids"].shape[1])), [])
    report.header["warnings"] = [warning] if warning else []
    rep = Reporter(len(specs) * s.repeats, s.tokens, err)
    try:
        model, pristine = None, False
        for spec in specs:
            if spec.kind == "accelerate" or not pristine:
                model = None  # free the host copy first: accelerate loads its own, a reload replaces it
                gc.collect()
            if spec.kind != "accelerate" and model is None:
                model, pristine = load_host_model(env), True
            res = _run_one(spec, model, inputs, s, env, pad_id, rep, plans)
            # Detaching a quantized engine leaves the dequantized (lossy) weights in the model:
            # the next variant gets a fresh copy of the checkpoint.
            pristine = pristine and not (spec.kind == "torus" and spec.weight_quant is not None)
            if res.status == "skipped":
                rep.total -= s.repeats
                rep.note(f"{spec.name}: skipped ({res.reason})")
            report.variants.append(res)
            write_json(report, json_path)  # a run cut short still leaves what it measured
    finally:
        rep.close()
    for v in report.variants:
        apply_ceiling(v, env.bandwidth_bps)
        if v.tokens is not None:
            v.text = tokenizer.decode(v.tokens, skip_special_tokens=True)
    report.reference = compare_texts(report.variants)
    report.wall_s = time.perf_counter() - t_start
    report.header["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_json(report, json_path)
    png = write_chart(report, out_dir / "bench.png")
    console.print(render_table(report))
    for v in report.variants:
        if v.status != "ok":
            console.print(f"{v.name}: {v.status}: {v.reason}", highlight=False, markup=False)
    console.print(f"wrote {json_path} and {png} ({report.wall_s:.0f} s)", highlight=False, markup=False)
    return report


def _run_one(
    spec: VariantSpec,
    model: Any,
    inputs: Any,
    s: BenchSettings,
    env: Env,
    pad_id: Any,
    rep: Reporter,
    plans: dict[str, Any],
) -> VariantResult:
    """Run one variant. An accelerate failure is recorded, not raised: it is not this project's."""
    if spec.kind == "baseline":
        return run_baseline(model, inputs, s, env, pad_id, rep)
    if spec.kind == "torus":
        return run_torus(model, inputs, s, env, pad_id, rep, spec, plans[spec.name])
    try:
        return run_accelerate(inputs, s, env, pad_id, rep)
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        return VariantResult("accelerate", "accelerate", status="failed", reason=f"{type(exc).__name__}: {exc}")


def settings_from_args(args: Any) -> BenchSettings:
    """`BenchSettings` from the `torus-sparse bench` command line."""
    quants: Sequence[str] = args.weight_quant or ["none"]
    return BenchSettings(
        model=args.model,
        vram=args.vram,
        tokens=args.tokens,
        prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt,
        lookaheads=tuple(args.lookahead or [2]),
        weight_quants=tuple(QUANT_NAMES[q] for q in quants),
        quant_group_size=args.quant_group_size,
        transport=args.transport,
        link_bandwidth=args.link_bandwidth,
        repeats=args.repeats,
        out=Path(args.out) if args.out else None,
        accelerate=not args.no_accelerate,
        baseline=not args.no_baseline,
        device=args.device,
        dtype=args.dtype,
        kv_reserve_tokens=args.kv_reserve_tokens,
        threads=args.threads,
    )
