"""The census of a decode step: dispatched ops, host syncs and the engine's Python time.

On a GPU at batch 1 a decode step's speed is set by counts, not bytes: every host sync drains the
device queue (tens of µs plus the bubble behind it) and every dispatched op costs ~5-10 µs of CPU
to launch. Those counts are the same on the CPU, so they are measured here, where no GPU is needed:

- `OpCensus` (a `TorchDispatchMode`, below autograd) counts every aten op a step dispatches, and
  the ones that read device values back to the host (`SYNC_OPS`, and copies from the device to
  the host or blocking copies onto it);
- the engine's named host waits (`host_compute.staging.wait_host`) count as syncs where they run,
  on the CPU too;
- `HostReads` (a `TorchFunctionMode`) catches the host reads that never reach the dispatcher on a
  CPU tensor (`tolist`, `numpy`), and, when the compute device is the CPU, the blocking
  `.to(device)` / `.cpu()` crossings written in the engine's own code (no-ops on a CPU, a sync
  each on a GPU);
- `engine_python_s` sums cProfile's own time ("tottime") of every function in the engine's
  packages (`torus_plugins`, `torus_adapters`): the Python the engine adds to a step, with the
  profiler's overhead in it (so it is an upper bound, comparable between runs).

`tiny_model(name)` builds the census' models (tiny random configs of each family, as the tests'
`conftest.py` does); `measure(name, mode)` attaches the engine in one of `MODES`, prefills 8
tokens, runs two decode steps and counts the second.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import cProfile
import pstats
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that read device values to the host (each one a host sync on a GPU)
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "nonzero_static",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "masked_select",
        "equal",
        "is_nonzero",
        "item",
        "repeat_interleave",  # with a tensor of repeats: the output size is read on the host
    }
)
#: ops that make a view (metadata only: no kernel runs on a device)
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "expand",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "reshape",
        "split",
        "chunk",
        "unbind",
    }
)
#: Python-level host reads that never dispatch on a CPU tensor
_READS = ("tolist", "numpy", "__array__")
#: what marks the engine's own code (frames, profile entries)
ENGINE_PATHS = ("/torus_plugins/", "/adapters/transformers_adapter/", "/torus_adapters/")


def _is_engine_file(filename: str) -> bool:
    return any(p in filename for p in ENGINE_PATHS)


def _devices(x: Any) -> set[str]:
    out = set()
    for t in x if isinstance(x, (list, tuple)) else (x,):
        if isinstance(t, torch.Tensor):
            out.add(t.device.type)
    return out


class OpCensus(TorchDispatchMode):
    """Counts dispatched aten ops by name, and host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in SYNC_OPS:
            if name != "repeat_interleave" or (args and isinstance(args[1] if len(args) > 1 else None, torch.Tensor)):
                self.syncs[name] += 1
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and not kwargs.get("non_blocking", False):
            src = _devices(args[1] if name == "copy_" and len(args) > 1 else args[0])
            dst = _devices(out)
            if src != dst and (src | dst) - {"cpu"}:
                self.syncs["device<->host copy"] += 1  # blocking crossing: the host waits
        elif name == "_to_copy":
            if "cpu" in _devices(out) and _devices(args[0]) - {"cpu"}:
                self.syncs["device->host copy"] += 1  # non_blocking into pageable memory still waits
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


class HostReads(TorchFunctionMode):
    """Host reads the dispatcher does not see on a CPU tensor (`tolist`, `numpy`), and, with
    `crossings`, blocking `.to(<device>)` / `.cpu()` / `.cuda()` calls made by the engine's code
    (which are no-ops while the compute device is the CPU, and host syncs on a GPU)."""

    def __init__(self, census: OpCensus, crossings: bool) -> None:
        super().__init__()
        self.census, self.crossings = census, crossings

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.census.syncs[f"Tensor.{name}"] += 1
        elif self.crossings and name in ("to", "cpu", "cuda") and not kwargs.get("non_blocking", False):
            if (name != "to" or _names_device(args[1:], kwargs)) and _is_engine_file(
                sys._getframe(1).f_code.co_filename
            ):
                self.census.syncs[f"Tensor.{name}(device) in engine code"] += 1
        return func(*args, **kwargs)


def _names_device(args: tuple, kwargs: dict) -> bool:
    if "device" in kwargs:
        return True
    for a in args:
        if isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda")):
            return True
        if isinstance(a, bool) and a:  # .to(dtype, non_blocking=True) positional
            return False
    return False


@contextlib.contextmanager
def counting(crossings: bool) -> Iterator[OpCensus]:
    """Count what runs inside. Also counts the engine's named host waits (`staging.wait_host`:
    a host-computed layer's one sync, a no-op on a CPU device but an event wait on a GPU)."""
    from torus_plugins.host_compute import staging

    census = OpCensus()
    named = staging.wait_host

    def wait_host(event: Any) -> None:
        census.syncs["staging.wait_host"] += 1
        named(event)

    staging.wait_host = wait_host
    try:
        with HostReads(census, crossings), census:
            yield census
    finally:
        staging.wait_host = named


def engine_python_s(profile: cProfile.Profile) -> float:
    """Own time of the engine's Python functions in a profile."""
    stats = pstats.Stats(profile)
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if _is_engine_file(filename):
            total += tottime
    return total


# --------------------------------------------------------------------------- the models
_MOE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
_DENSE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
#: experts / top-k of the census' MoE models: OLMoE-1B-7B's ratio (64 / 8), shrunk
EXPERTS, TOP_K = 16, 4


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as T

    moe = dict(num_experts_per_tok=TOP_K)
    return {
        "llama": lambda: T.LlamaConfig(**_DENSE, intermediate_size=64),
        "qwen3": lambda: T.Qwen3Config(**_DENSE, intermediate_size=64, head_dim=8),
        "mixtral": lambda: T.MixtralConfig(**_MOE, intermediate_size=48, num_local_experts=EXPERTS, **moe),
        "olmoe": lambda: T.OlmoeConfig(**_MOE, intermediate_size=48, num_experts=EXPERTS, **moe),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **_MOE, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=EXPERTS, **moe
        ),
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **{**_MOE, "num_key_value_heads": 4},
            intermediate_size=64,
            moe_intermediate_size=48,
            n_routed_experts=EXPERTS,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **moe,
        ),
        "gpt_oss": lambda: T.GptOssConfig(
            **_MOE, head_dim=8, intermediate_size=48, num_local_experts=EXPERTS, sliding_window=16, **moe
        ),
    }


DENSE = ("llama", "qwen3")
MOE = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss")
ARCHS = DENSE + MOE


def tiny_model(name: str, experts_implementation: str = "grouped_mm", seed: int = 0) -> torch.nn.Module:
    """A random-init causal LM of the family (float32, eval), deterministic for a seed."""
    import transformers as T

    torch.manual_seed(seed)
    config = _configs()[name]()
    if name in MOE:
        model = T.AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation)
        if name == "deepseek_v3":  # random init leaves the routing bias at zero: make it matter
            for layer in model.model.layers:
                bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(torch.rand(bias.shape) * 0.1)
    else:
        model = T.AutoModelForCausalLM.from_config(config)
    return model.eval()


# --------------------------------------------------------------------------- the modes
#: mode -> attach settings (None: the unwrapped model). MoE caches hold half of all experts.
MODES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "plain-eager": None,  # MoE only: the unwrapped model with transformers' eager expert loop
    "streamed": dict(transport="copy", resident_layers=0, moe_predictor="none"),
    "streamed+pred": dict(transport="copy", resident_layers=0, moe_predictor="speculative"),
    "split": dict(transport="copy", resident_layers=0, host_compute="auto", host_share=0.5, host_max_tokens=1),
    "host": dict(transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1, moe_predictor="none"),
    "int8": dict(transport="copy", resident_layers=0, weight_quant="int8", moe_predictor="none"),
    "int4": dict(transport="copy", resident_layers=0, weight_quant="int4", moe_predictor="none"),
}
DENSE_ONLY = {"split"}
MOE_ONLY = {"plain-eager", "streamed+pred"}


def modes_for(name: str) -> list[str]:
    skip = MOE_ONLY if name in DENSE else DENSE_ONLY
    return [m for m in MODES if m not in skip]


@dataclass
class Count:
    """One (model, mode) census of a decode step (the second after an 8-token prefill)."""

    model: str
    mode: str
    layers: int
    ops: int
    syncs: int
    ops_per_layer: float
    syncs_per_layer: float
    engine_py_us_per_layer: float  # profiled own time of the engine's Python, per layer
    step_ms: float  # unprofiled, uncounted wall time of one decode step (median of 5)
    sync_kinds: dict[str, int] = field(default_factory=dict)
    top_ops: dict[str, int] = field(default_factory=dict)
    expert_hits: int | None = None
    expert_misses: int | None = None
    logits_equal_plain: bool | None = None  # against the unwrapped model with the same experts arithmetic
    max_abs_diff_plain: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROMPT = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 22]])


def _decode_inputs(model: torch.nn.Module) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Prefill, then one warm decode step; returns (cache, next input, cache position)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(PROMPT, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    pos = PROMPT.shape[1]
    out = model(tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]))
    return cache, out.logits[:, -1:].argmax(-1), torch.tensor([pos + 1])


def _fresh(cache: Any) -> Any:
    """A copy of the cache as it stands (every counted or timed step starts from the same one)."""
    return copy.deepcopy(cache)


def _step(model: torch.nn.Module, cache: Any, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = model(tok, past_key_values=cache, use_cache=True, cache_position=pos)
    return out.logits


def _attach_settings(name: str, mode: str, model: torch.nn.Module) -> dict[str, Any]:
    settings = dict(MODES[mode] or {})
    if name in MOE:
        from torus_adapters.transformers_adapter.moe_architectures import moe_info

        info = moe_info(model)
        settings["moe_cache_experts"] = info["moe_layers"] * info["experts"] // 2
    else:
        settings.pop("moe_predictor", None)
    return settings


@torch.no_grad()
def measure(name: str, mode: str, repeats: int = 5) -> Count:
    """Attach in `mode`, prefill, one warm decode step, then count the next one."""
    import torus_plugins as tp

    plain_impl = "eager" if mode == "plain-eager" else "grouped_mm"
    model = tiny_model(name, plain_impl)
    layers = model.config.num_hidden_layers
    ref_logits = None
    if mode not in ("plain", "plain-eager"):
        ref = tiny_model(name, "grouped_mm")
        cache, tok, pos = _decode_inputs(ref)
        ref_logits = _step(ref, cache, tok, pos)
        del ref
    engine = None
    if MODES[mode] is not None:
        engine = tp.attach(model, **_attach_settings(name, mode, model))
    try:
        cache, tok, pos = _decode_inputs(model)
        stats0 = _expert_totals(engine)
        run = _fresh(cache)
        with counting(crossings=True) as census:
            logits = _step(model, run, tok, pos)
        stats1 = _expert_totals(engine)
        run = _fresh(cache)
        prof = cProfile.Profile()
        prof.enable()
        _step(model, run, tok, pos)
        prof.disable()
        times = []
        for _ in range(repeats):
            run = _fresh(cache)
            t0 = time.perf_counter()
            _step(model, run, tok, pos)
            times.append(time.perf_counter() - t0)
    finally:
        if engine is not None:
            tp.detach(model)
    times.sort()
    count = Count(
        model=name,
        mode=mode,
        layers=layers,
        ops=census.total,
        syncs=census.total_syncs,
        ops_per_layer=census.total / layers,
        syncs_per_layer=census.total_syncs / layers,
        engine_py_us_per_layer=engine_python_s(prof) / layers * 1e6,
        step_ms=times[len(times) // 2] * 1e3,
        sync_kinds=dict(census.syncs),
        top_ops=dict(census.ops.most_common(12)),
    )
    if stats1 is not None and stats0 is not None:
        count.expert_hits, count.expert_misses = stats1[0] - stats0[0], stats1[1] - stats0[1]
    if ref_logits is not None:
        count.logits_equal_plain = bool(torch.equal(logits, ref_logits))
        count.max_abs_diff_plain = float((logits - ref_logits).abs().max())
    return count


def _expert_totals(engine: Any) -> tuple[int, int] | None:
    if engine is None:
        return None
    st = engine.stats().experts
    if st is None:
        return None
    return sum(x.hits for x in st.layers), sum(x.misses for x in st.layers)


def landing_ops(mode: str, shape: tuple[int, int] = (256, 512), group_size: int = 32) -> dict[str, Any]:
    """Dispatched ops (and the largest temporary, in bytes) of landing one quantized matrix:
    `quant.dequantize_into` from the stored codes into a compute-dtype matrix."""
    from torus_plugins import quant

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, meta = quant.quantize(w, mode, group_size)
    dst = torch.empty_like(w)
    quant.dequantize_into(dst, q, meta, mode)  # warm (caches, lazily built tables)
    with counting(crossings=False) as census:
        quant.dequantize_into(dst, q, meta, mode)
    kernels = sum(n for name, n in census.ops.items() if name not in VIEW_OPS)
    return {
        "mode": mode,
        "shape": list(shape),
        "ops": census.total,
        "kernels": kernels,
        "ops_by_name": dict(census.ops),
    }
