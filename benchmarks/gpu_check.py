"""GPU check: a ~7B Llama streamed by torus-sparse (bf16, int8, int4) against the same model fully
resident and against accelerate's CPU offload at the same device budget.

One command, no network, under 8 minutes on one H100/H200 (the script guards itself to
--max-seconds, default 420 s):

    python3 benchmarks/gpu_check.py            # the real check (needs CUDA)
    python3 benchmarks/gpu_check.py --tiny     # same script, tiny model; runs on the CPU too

Phases, all on ONE host model (no deepcopy; host RAM holds one copy plus the engine's store):

 1. Build: a random-init LlamaForCausalLM (hidden 4096, intermediate 11008, 32 layers, 32 heads,
    vocab 32000: 6.74 B parameters, 13.5 GB in bf16). The module tree is built with no storage
    (accelerate's `init_empty_weights`, so only the rotary buffers are real), then every parameter
    is created directly in bf16 on the host: `torch.manual_seed(seed)`, then `normal_(0, 0.02)` per
    matrix in `named_parameters()` order and ones for the RMSNorm weights. No float32 copy, no
    transformers default init (which would cost minutes on the CPU).
 2. Link: pinned host->device bandwidth. A pinned 1 GiB uint8 buffer is copied into a device
    buffer with `non_blocking=True` on a side stream, timed with CUDA events on that stream; one
    warm-up, best of 5. The same is done for one FFN layer's bytes (the engine's transfer unit).
    Without CUDA (`--tiny` on the CPU) a host memcpy of the same sizes is timed instead.
 3. Baseline: `model.to("cuda")` (everything resident), logits of a fixed 32-token prompt, a
    short warm-up generation, then the timed decode; peak memory; `model.to("cpu")`.
 4. Side by side, in this order (so that a time-guard cut drops extra lookaheads before it drops a
    comparison): torus bf16 at lookahead 2, accelerate offload, torus int8 and int4 at lookahead
    2, then the other lookaheads (1, 3) of bf16, int8, int4.
    * torus-sparse: `attach(model, transport="cuda", vram_budget=B, lookahead=L, weight_quant=
      None | "int8" | "int4")` (int4 at the engine's default group size, 32), B computed from the model's own sizes so
      that --resident-ffn (default 4) bf16 FFN layers fit:
          B(L) = non-FFN bytes + KV reserve (kv_reserve_tokens x KV bytes/token)
                 + (L + 1) ring slots x layer bytes + resident_ffn x layer bytes + layer/2 slack
      The same B(L) for every format: a quantized slot holds the landed bytes plus the
      dequantized layer, so the planner may keep fewer layers resident for int8/int4. Before
      attach, the planner (`torus_plugins.planning.deployment.make_plan`, shapes only) predicts the plan and
      the link ceiling (bandwidth / streamed bytes per token); both are recorded next to what the
      engine chose and measured. Logits of the prompt against the baseline (`torch.equal`, max
      |diff|, top-1 agreement), warm-up, `reset_stats()`, timed decode, stats, peak memory, the
      host store's page-locking (exact-size cudaHostRegister bytes, pinned-allocator fallbacks)
      and `torch.cuda.host_memory_stats()`, then `detach(model)`.
    * accelerate offload (same budget as torus at lookahead 2): `infer_auto_device_map(model,
      max_memory={0: B(2), "cpu": ...}, no_split_module_classes=["LlamaDecoderLayer"])`, then
      `dispatch_model(model, device_map, offload_buffers=False)`: the decoder layers that do not
      fit stay on the host and accelerate's hooks copy them to the GPU (pageable, synchronously)
      at every forward pass. `--accelerate-memory weights` gives it B minus the KV reserve instead
      (the device memory torus has for weights). Batch-1 offload is slow, so it decodes only
      --accelerate-steps (4) tokens, once, after a 1-step warm-up. Afterwards
      `remove_hook_from_module(model, recurse=True)` and every original host Parameter object is
      put back, so later phases run on the same weights (the next bf16 run's logits check shows it).
    * Quantized runs: detach() after a quantized attach leaves the *dequantized* weights in the
      model (documented: the engine does not keep the originals), so after every run the original
      host FFN tensors are re-bound; every run therefore quantizes the same original weights.

Timed decode (every phase): greedy, batch 1, KV cache, `generate(max_new_tokens = min_new_tokens
= steps + 1)`. A logits processor, called once per new token right after that token's forward
pass, synchronises the *compute* stream (`torch.cuda.current_stream().synchronize()`, not the
whole device, so the engine's copy stream keeps running) and reads `time.perf_counter()`.
decode tok/s = steps / (t[steps] - t[0]): prefill excluded, every decode step included.
generate() already synchronises the host with the compute stream once per token (its stopping
check reads a device tensor), so this adds no new wait.

Targets (summary in the JSON and under the table): torus bf16 >= 90% of the link ceiling (best
lookahead) and >= 3x accelerate offload's tok/s at the same budget (lookahead 2's budget); torus
int8 >= 1.8x and int4 >= 3x torus bf16 tok/s (best lookahead of each).

Output: a table on stdout, JSON at --out, else $OUT/gpu_check.json when OUT is set, else
benchmarks/results/gpu_check.json (gpu_check_tiny.json with --tiny). The JSON is rewritten after
every phase, so a run cut off by a time limit still leaves what it measured. Before each phase
the script predicts its duration (the previous run of the same format, else the link speed plus
an allowance for quantizing on the host) and skips it, saying so, if it would end after
--max-seconds. Exit status is 0 whether or not targets are met; non-zero only if the script
itself fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_LINK_FRACTION = 0.90
TARGET_VS_ACCELERATE = 3.0  # torus bf16 tok/s over accelerate offload at the same budget
TARGET_INT8 = 1.8  # torus int8 tok/s over torus bf16
TARGET_INT4 = 3.0  # torus int4 tok/s over torus bf16
QUANT_MODES = ("bf16", "int8", "int4")
GiB = 2**30

FULL = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8, vocab_size=1024)


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def default_out(tiny: bool) -> Path:
    name = "gpu_check_tiny.json" if tiny else "gpu_check.json"
    out = os.environ.get("OUT")
    return Path(out) / name if out else HERE / "results" / name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def host_pinned_stats() -> dict[str, Any] | None:
    """Pinned host memory held by PyTorch's host allocator (None where unavailable)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        s = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - informational only
        return None
    keep = (
        "allocated_bytes.current",
        "allocated_bytes.peak",
        "active_bytes.current",
        "num_host_alloc",
        "host_alloc_time.total",
    )
    out = {k: v for k, v in s.items() if k in keep}
    return out or {k: v for k, v in s.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- model
def build_model(dims: dict[str, int], seed: int, std: float = 0.02) -> nn.Module:
    """A LlamaForCausalLM with deterministic random bf16 weights, made without a float32 pass."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with init_empty_weights():  # parameters on `meta`, buffers (rotary inv_freq) real
        model = LlamaForCausalLM(cfg)
    torch.manual_seed(seed)
    for _, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if p.ndim == 1:  # RMSNorm weights (Llama has no biases)
                t.fill_(1.0)
            else:
                t.normal_(0.0, std)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {name} was left on the meta device")
    model.config.dtype = torch.bfloat16
    model.eval()
    return model


def ffn_and_non_ffn_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of one FFN layer, bytes of everything that is not FFN), as the engine counts them."""
    layers = model.model.layers
    ffn_ids = {id(p) for layer in layers for p in layer.mlp.parameters()}
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.mlp.parameters()) for layer in layers)
    seen: set[int] = set()
    non_ffn = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in ffn_ids or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        non_ffn += t.numel() * t.element_size()
    return layer_bytes, non_ffn


def kv_bytes_per_token(model: nn.Module) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2  # bf16


# --------------------------------------------------------------------------- bandwidth
def fill_random_bytes(buf: torch.Tensor, chunk: int = 2**20) -> None:
    """Random bytes, cheaply: one random 1 MiB block repeated (content does not change copy speed,
    but a non-constant pattern makes the spot check of the copied bytes meaningful)."""
    block = torch.randint(0, 256, (chunk,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    n = buf.numel() // chunk * chunk
    if n:
        buf[:n].view(-1, chunk).copy_(block.expand(n // chunk, chunk))
    if buf.numel() > n:
        buf[n:].copy_(block[: buf.numel() - n])


def empty_pinned_cache() -> bool:
    """Return cached pinned blocks to the driver (names differ across torch versions; best effort),
    so the pinned-memory figures read later show the engine's store, not this test's buffer."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache", "_cuda_hostEmptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            try:
                fn()
                return True
            except Exception:  # noqa: BLE001 - informational only
                pass
    return False


def link_bandwidth(device: torch.device, sizes: dict[str, int], reps: int = 5) -> dict[str, Any]:
    """Best-of-`reps` host->device bandwidth per named size (CUDA: pinned, events, side stream)."""
    biggest = max(sizes.values())
    out: dict[str, Any] = {}
    if device.type == "cuda":
        host = torch.empty(biggest, dtype=torch.uint8, pin_memory=True)
        fill_random_bytes(host)
        dev = torch.empty(biggest, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device=device)
        for name, n in sizes.items():
            times = []
            for i in range(reps + 1):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    e0.record(stream)
                    dev[:n].copy_(host[:n], non_blocking=True)
                    e1.record(stream)
                e1.synchronize()
                if i:  # the first is a warm-up
                    times.append(e0.elapsed_time(e1) / 1e3)
            ok = torch.equal(dev[:4096].cpu(), host[:4096]) and torch.equal(dev[n - 4096 : n].cpu(), host[n - 4096 : n])
            out[name] = {"bytes": n, "best_s": min(times), "GBps": n / min(times) / 1e9, "all_s": times, "verified": ok}
        out["method"] = (
            "pinned host -> device, copy_(non_blocking=True) on a side stream, CUDA events, best of %d" % reps
        )
        del host, dev
        torch.cuda.synchronize(device)
        out["pinned_cache_emptied"] = empty_pinned_cache()
    else:
        src = torch.empty(biggest, dtype=torch.uint8)
        fill_random_bytes(src)
        dst = torch.empty_like(src)
        for name, n in sizes.items():
            times = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                dst[:n].copy_(src[:n])
                t = time.perf_counter() - t0
                if i:
                    times.append(t)
            out[name] = {
                "bytes": n,
                "best_s": min(times),
                "GBps": n / min(times) / 1e9,
                "all_s": times,
                "verified": True,
            }
        out["method"] = "no CUDA: host memcpy (Tensor.copy_), perf_counter, best of %d" % reps
    return out


# --------------------------------------------------------------------------- decode
class StepClock:
    """Logits processor: per new token, wait for the compute stream, then take the time."""

    def __init__(self, device: torch.device) -> None:
        self.times: list[float] = []
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.current_stream(device).synchronize()) if device.type == "cuda" else (lambda: None)
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._sync()
        self.times.append(time.perf_counter())
        return scores


def decode(model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    n = steps + 1
    clock = StepClock(device)
    with torch.inference_mode():
        sync(device)
        t_enter = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )
        sync(device)
        t_exit = time.perf_counter()
    t = clock.times
    new = out[0, ids.shape[1] :].tolist()
    if len(t) != n or len(new) != n:
        raise RuntimeError(f"expected {n} tokens and timestamps, got {len(new)} and {len(t)}")
    decode_s = t[-1] - t[0]
    return {
        "tokens": new,
        "decode_steps": steps,
        "decode_s": decode_s,
        "tok_per_s": steps / decode_s,
        "ms_per_token": decode_s * 1e3 / steps,
        "prefill_s": t[0] - t_enter,
        "generate_wall_s": t_exit - t_enter,
    }


def timed_decodes(
    model: nn.Module, ids: torch.Tensor, steps: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """`repeats` timed decodes; the median run's numbers, plus every run's tok/s and tokens check."""
    runs = [decode(model, ids, steps, device) for _ in range(repeats)]
    order = sorted(runs, key=lambda r: r["tok_per_s"])
    mid = order[(len(order) - 1) // 2]  # lower median: never flatters
    out = dict(mid)
    out["repeats"] = repeats
    out["tok_per_s_all"] = [r["tok_per_s"] for r in runs]
    out["tokens_consistent"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return out


def prompt_logits(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        sync(device)
    return logits.cpu()


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    return {
        "equal": bool(torch.equal(ref, got)),
        "max_abs_diff": float((ref.float() - got.float()).abs().max()),
    }


# --------------------------------------------------------------------------- main
def ffn_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.model.layers for p in layer.mlp.parameters()]


def store_pinning(eng: Any) -> dict[str, Any]:
    """How the engine's host store is page-locked (exact-size cudaHostRegister, or the fallback)."""
    store = eng.store
    registered = getattr(store, "_registered", set())
    bufs = [b for b in store.buffers if b is not None]
    reg_bytes = sum(b.numel() for b in bufs if b.data_ptr() in registered)
    return {
        "store_bytes": store.nbytes,
        "store_buffers": len(bufs),
        "page_locked_by_cudaHostRegister_bytes": reg_bytes,
        "pinned_allocator_fallback_buffers": sum(1 for b in bufs if b.data_ptr() not in registered and b.is_pinned())
        if torch.cuda.is_available()
        else 0,
    }


def planner_prediction(model: nn.Module, cfg: Any, link_Bps: float, device: torch.device) -> dict[str, Any]:
    """The planner's plan and link-ceiling prediction for `cfg`, from shapes alone (before attach)."""
    from torus_plugins.planning.deployment import make_plan
    from torus_plugins.plugins import resolve
    from torus_plugins.planning.sizes import measure

    arch = next(a for a in resolve().architectures if a.matches(model))
    sizes = measure(model, arch, cfg.weight_quant, cfg.quant_group_size)
    plan = make_plan(sizes, cfg, link_Bps, model="llama-random", device=str(device))
    d = plan.as_dict()
    return {
        k: d[k]
        for k in (
            "fits",
            "reason",
            "resident_layers",
            "streamed_layers",
            "n_slots",
            "slot_bytes",
            "streamed_bytes_per_token",
            "device_bytes",
            "host_bytes",
            "predicted_tok_s",
            "config",
        )
    }


def top1_agreement(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.argmax(-1) == got.argmax(-1)).float().mean())


def run_accelerate(
    model: nn.Module,
    budget: int,
    weight_memory: int,
    device: torch.device,
    ids: torch.Tensor,
    steps: int,
    ref_logits: torch.Tensor,
) -> dict[str, Any]:
    """accelerate's big-model inference at the same device budget, from the same host weights.

    `infer_auto_device_map(max_memory={gpu: weight_memory, "cpu": ...})` + `dispatch_model(
    offload_buffers=False)`: decoder layers that do not fit are offloaded to the CPU and moved to
    the GPU (pageable, synchronous) by accelerate's hooks at every forward pass. Afterwards the hooks are removed and
    every original host Parameter/buffer object is put back, so later phases see the same model.
    Without CUDA (--tiny on the CPU) the same code offloads to "disk" (a temp dir) instead.
    """
    import shutil
    import tempfile

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    saved_p = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
    saved_b = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    no_split = list(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    if device.type == "cuda":
        max_memory: dict[Any, Any] = {device.index: weight_memory, "cpu": 2**40}
        offload_kinds = ("cpu", "disk")
    else:
        max_memory = {"cpu": weight_memory}  # the rest goes to "disk"
        offload_kinds = ("disk",)
    entry: dict[str, Any] = {
        "vram_budget": budget,
        "max_memory_for_weights": weight_memory,
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "no_split_module_classes": no_split,
        "decode_steps": steps,
        "note": f"accelerate is slow at batch 1 (every offloaded layer crosses the link synchronously, pageable): "
        f"only {steps} decode steps, 1 repeat",
    }
    offload_dir = None
    t0 = time.perf_counter()
    dm = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch.bfloat16)
    entry["device_map_s"] = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for v in dm.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    entry["device_map_counts"] = counts
    entry["offloaded_modules"] = [k for k, v in dm.items() if str(v) in offload_kinds]
    entry["offloaded_bytes"] = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if any(name == m or name.startswith(m + ".") for m in entry["offloaded_modules"])
    )
    try:
        if any(str(v) == "disk" for v in dm.values()):
            offload_dir = tempfile.mkdtemp(prefix="gpu_check_offload_")
        free_device_memory(device)
        t0 = time.perf_counter()
        dispatch_model(
            model,
            device_map=dm,
            main_device=device.index if device.type == "cuda" else "cpu",
            offload_dir=offload_dir,
            offload_buffers=False,
        )
        sync(device)
        entry["dispatch_s"] = time.perf_counter() - t0
        got = prompt_logits(model, ids, device)
        entry["logits"] = compare(ref_logits, got)
        decode(model, ids, 1, device)  # warm-up
        res = timed_decodes(model, ids, steps, 1, device)
        entry.update(res)
        entry["peak_allocated"] = peak_allocated(device)
        entry["peak_reserved"] = peak_reserved(device)
    finally:
        t0 = time.perf_counter()
        remove_hook_from_module(model, recurse=True)
        for m, n, p in saved_p:
            m._parameters[n] = p
        for m, n, b in saved_b:
            m._buffers[n] = b
        model.__dict__.pop("hf_device_map", None)
        if offload_dir:
            shutil.rmtree(offload_dir, ignore_errors=True)
        free_device_memory(device)
        entry["undispatch_s"] = time.perf_counter() - t0
    entry["host_params_restored"] = all(p.device.type == "cpu" for p in model.parameters())
    return entry


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny Llama (8 layers, hidden 256); CPU + transport 'copy' when no CUDA"
    )
    ap.add_argument(
        "--decode-steps", type=int, default=32, help="decode steps timed (generate makes one more token; default 32)"
    )
    ap.add_argument("--warmup-tokens", type=int, default=4, help="untimed tokens generated before the timed decodes")
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed decodes per run; the (lower) median is reported (default 2)"
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=420.0,
        help="skip a phase whose predicted duration would end the script after this (default 420)",
    )
    ap.add_argument("--lookaheads", default="1,2,3", help="comma-separated lookaheads for the streamed runs")
    ap.add_argument("--quant", default="bf16,int8,int4", help="streamed weight formats: bf16 (none), int8, int4")
    ap.add_argument(
        "--quant-group-size",
        type=int,
        default=None,
        help="TorusConfig.quant_group_size for int4 (default: the engine's, 32: the size that meets the quality target)",
    )
    ap.add_argument(
        "--accelerate-steps", type=int, default=4, help="decode steps timed for accelerate offload (default 4)"
    )
    ap.add_argument("--no-accelerate", action="store_true", help="skip the accelerate offload comparison")
    ap.add_argument(
        "--accelerate-memory",
        choices=("budget", "weights"),
        default=None,
        help="accelerate's max_memory on the device: the whole vram budget (default; accelerate may use the "
        "KV reserve for weights) or 'weights' = budget minus the KV reserve (default with --tiny, where the "
        "KV reserve is most of the budget and nothing would be offloaded otherwise)",
    )
    ap.add_argument(
        "--same-budget-lookahead",
        type=int,
        default=2,
        help="accelerate gets the budget of the streamed runs at this lookahead (default 2)",
    )
    ap.add_argument(
        "--resident-ffn",
        type=int,
        default=None,
        help="FFN layers the computed budget keeps resident (default 4; tiny 2)",
    )
    ap.add_argument(
        "--kv-reserve-tokens", type=int, default=4096, help="TorusConfig.kv_reserve_tokens (counted in the budget)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import transformers

    import torus_plugins as tp
    from torus_plugins import TorusConfig

    if args.quant_group_size is None:
        args.quant_group_size = TorusConfig.quant_group_size

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        print(
            "gpu_check: CUDA is not available; the full check needs a GPU (use --tiny to smoke-test on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu")
    transport = "cuda" if has_cuda else "copy"
    dims = TINY if args.tiny else FULL
    resident_ffn = args.resident_ffn if args.resident_ffn is not None else (2 if args.tiny else 4)
    lookaheads = [int(x) for x in args.lookaheads.split(",") if x.strip()]
    modes = [x.strip() for x in args.quant.split(",") if x.strip()]
    for m in modes:
        if m not in QUANT_MODES:
            ap.error(f"--quant: unknown format {m!r}; use {', '.join(QUANT_MODES)}")
    acc_memory = args.accelerate_memory or ("weights" if args.tiny else "budget")
    same_la = args.same_budget_lookahead if args.same_budget_lookahead in lookaheads else lookaheads[0]
    out_path = args.out or default_out(args.tiny)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_script = time.perf_counter()

    report: dict[str, Any] = {
        "benchmark": "gpu_check" + ("_tiny" if args.tiny else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if has_cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if has_cuda else None,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "accelerate": _version("accelerate"),
            "torus_sparse": tp.__version__,
            "torus_sparse_from": str(Path(tp.__file__).parent),
        },
        "settings": {
            "tiny": args.tiny,
            "dims": dims,
            "dtype": "bfloat16",
            "transport": transport,
            "decode_steps": args.decode_steps,
            "warmup_tokens": args.warmup_tokens,
            "repeats": args.repeats,
            "max_seconds": args.max_seconds,
            "lookaheads": lookaheads,
            "formats": modes,
            "quant_group_size": args.quant_group_size,
            "accelerate_steps": None if args.no_accelerate else args.accelerate_steps,
            "accelerate_memory": None if args.no_accelerate else acc_memory,
            "same_budget_lookahead": same_la,
            "resident_ffn_in_budget": resident_ffn,
            "kv_reserve_tokens": args.kv_reserve_tokens,
            "prompt_tokens": args.prompt_tokens,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "targets": {
            "bf16_link": f"torus bf16 decode tok/s >= {TARGET_LINK_FRACTION:.0%} of the link ceiling "
            "(pinned bandwidth / bytes per token)",
            "bf16_vs_accelerate": f"torus bf16 tok/s >= {TARGET_VS_ACCELERATE:g} x accelerate offload at the same budget",
            "int8_vs_bf16": f"torus int8 tok/s >= {TARGET_INT8:g} x torus bf16",
            "int4_vs_bf16": f"torus int4 tok/s >= {TARGET_INT4:g} x torus bf16",
        },
        "phases": {},
        "errors": [],
    }

    def save() -> None:
        report["wall_s"] = time.perf_counter() - t_script
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    # 1. build -----------------------------------------------------------------
    log(f"device {report['device']}; torch {torch.__version__}, transformers {transformers.__version__}")
    t0 = time.perf_counter()
    model = build_model(dims, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    layer_bytes, non_ffn = ffn_and_non_ffn_bytes(model)
    n_layers = dims["num_hidden_layers"]
    kv_tok = kv_bytes_per_token(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report["model"] = {
        "parameters": n_params,
        "bytes": model_bytes,
        "ffn_layer_bytes": layer_bytes,
        "ffn_total_bytes": layer_bytes * n_layers,
        "non_ffn_bytes": non_ffn,
        "kv_bytes_per_token": kv_tok,
        "build_s": time.perf_counter() - t0,
    }
    log(
        f"built {n_params / 1e9:.2f} B params ({fmt_bytes(model_bytes)}) in {report['model']['build_s']:.1f} s; "
        f"FFN layer {fmt_bytes(layer_bytes)}, non-FFN {fmt_bytes(non_ffn)}"
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    ids_cpu = torch.randint(3, dims["vocab_size"], (1, args.prompt_tokens), generator=g)
    save()

    # 2. link bandwidth ---------------------------------------------------------
    big = GiB if has_cuda else 256 * 2**20
    bw = link_bandwidth(device, {"1GiB" if has_cuda else "256MiB": big, "ffn_layer": layer_bytes})
    report["bandwidth"] = bw
    link_Bps = bw["1GiB" if has_cuda else "256MiB"]["GBps"] * 1e9
    log(f"link: {bw['method']}: big {link_Bps / 1e9:.2f} GB/s, one FFN layer {bw['ffn_layer']['GBps']:.2f} GB/s")
    free_device_memory(device)
    save()

    ids = ids_cpu.to(device)

    # 3. baseline ---------------------------------------------------------------
    t0 = time.perf_counter()
    model.to(device)
    sync(device)
    to_dev_s = time.perf_counter() - t0
    if has_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ref_logits = prompt_logits(model, ids, device)
    report["model"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    report["model"]["baseline_logits_finite"] = bool(torch.isfinite(ref_logits.float()).all())
    decode(model, ids, args.warmup_tokens, device)
    base = timed_decodes(model, ids, args.decode_steps, args.repeats, device)
    base.update(peak_allocated=peak_allocated(device), peak_reserved=peak_reserved(device), to_device_s=to_dev_s)
    report["phases"]["baseline"] = base
    log(
        f"baseline: {base['tok_per_s']:.2f} tok/s ({base['ms_per_token']:.2f} ms/token), peak {fmt_bytes(base['peak_allocated'])}"
    )
    t0 = time.perf_counter()
    model.to("cpu")
    base["to_host_s"] = time.perf_counter() - t0
    free_device_memory(device)
    save()

    kv_reserve = kv_tok * args.kv_reserve_tokens

    def budget_for(la: int) -> int:
        return non_ffn + kv_reserve + (la + 1 + resident_ffn) * layer_bytes + layer_bytes // 2

    # The host FFN weights as built. detach() after a quantized attach binds the *dequantized*
    # weights (documented behaviour: the engine keeps no originals), so these are re-bound after every run.
    original_ffn = [(p, p.data) for p in ffn_params(model)]

    # 4. schedule: one run of each kind first (same-budget lookahead), then the other lookaheads,
    # so a time-guard cut loses lookahead variants before it loses a comparison.
    schedule: list[tuple[str, str, int]] = [("torus", modes[0], same_la)] if modes else []
    if not args.no_accelerate:
        schedule.append(("accelerate", "bf16", same_la))
    schedule += [("torus", m, same_la) for m in modes[1:]]
    schedule += [("torus", m, la) for m in modes for la in lookaheads if la != same_la]
    last_run_s: dict[str, float] = {}

    def predict(kind: str, mode: str) -> float:
        if kind == "accelerate":
            # pageable copies of the offloaded layers at every forward pass (~10 GB/s guessed)
            offloaded = max(model_bytes - budget_for(same_la), 0)
            return (args.accelerate_steps + 4) * offloaded / 10e9 + 20.0
        if mode in last_run_s:
            return last_run_s[mode]
        scale = {"bf16": 1.0, "int8": 0.5, "int4": 0.27}[mode]
        tokens_streamed = args.warmup_tokens + args.repeats * (args.decode_steps + 1) + 1
        stream_s = tokens_streamed * n_layers * layer_bytes * scale / link_Bps * 1.3
        # quantizing on the host at attach, dequantizing at detach: ~1 s per GB of FFN weights
        quant_s = 0.0 if mode == "bf16" else 1.0 * n_layers * layer_bytes / 1e9
        return stream_s + quant_s + 20.0

    for kind, mode, la in schedule:
        name = "accelerate_offload" if kind == "accelerate" else f"torus_{mode}_la{la}"
        predicted = predict(kind, mode)
        elapsed = time.perf_counter() - t_script
        if elapsed + predicted > args.max_seconds:
            report["phases"][name] = {
                "kind": kind,
                "format": mode,
                "lookahead": la if kind == "torus" else None,
                "skipped": f"time guard: {elapsed:.0f} s elapsed + "
                f"{predicted:.0f} s predicted > --max-seconds {args.max_seconds:.0f}",
            }
            log(f"{name} skipped: {report['phases'][name]['skipped']}")
            save()
            continue
        t_run = time.perf_counter()
        budget = budget_for(la)
        if kind == "accelerate":
            entry: dict[str, Any] = {"kind": kind, "format": "bf16", "same_budget_as_lookahead": la}
            report["phases"][name] = entry
            try:
                weight_memory = budget - kv_reserve if acc_memory == "weights" else budget
                entry["accelerate_memory"] = acc_memory
                entry.update(
                    run_accelerate(model, budget, weight_memory, device, ids, args.accelerate_steps, ref_logits)
                )
                log(
                    f"{name}: {entry['tok_per_s']:.3f} tok/s ({entry['ms_per_token']:.0f} ms/token), "
                    f"offloaded {len(entry['offloaded_modules'])} modules ({fmt_bytes(entry['offloaded_bytes'])}), "
                    f"peak {fmt_bytes(entry['peak_allocated'])} / budget {fmt_bytes(budget)}"
                )
            except Exception as exc:  # noqa: BLE001 - record and go on
                entry["error"] = f"{type(exc).__name__}: {exc}"
                report["errors"].append({name: traceback.format_exc()})
                log(f"{name} FAILED: {entry['error']}")
            entry["run_s"] = time.perf_counter() - t_run
            save()
            continue

        quant = None if mode == "bf16" else mode
        cfg = TorusConfig(
            transport=transport,
            device=str(device),
            vram_budget=budget,
            lookahead=la,
            kv_reserve_tokens=args.kv_reserve_tokens,
            weight_quant=quant,
            quant_group_size=args.quant_group_size,
        )
        entry = {
            "kind": kind,
            "format": mode,
            "lookahead": la,
            "vram_budget": budget,
            "budget_formula": (
                "non_ffn + kv_reserve_tokens*kv_bytes_per_token + (lookahead+1+resident_ffn)*ffn_layer_bytes + ffn_layer_bytes/2"
            ),
        }
        report["phases"][name] = entry
        try:
            entry["planner"] = planner_prediction(model, cfg, link_Bps, device)
            free_device_memory(device)
            t0 = time.perf_counter()
            eng = tp.attach(model, cfg)
            sync(device)
            entry["attach_s"] = time.perf_counter() - t0
            entry["plan"] = {
                "resident": list(eng.plan.resident),
                "streamed": list(eng.plan.streamed),
                "n_slots": eng.plan.n_slots,
                "slot_bytes": eng.plan.slot_bytes,
                "planned_device_bytes": eng.plan.device_bytes(eng.layer_bytes),
            }
            entry["planner_matches_engine"] = (
                entry["planner"]["resident_layers"] == entry["plan"]["resident"]
                and entry["planner"]["streamed_layers"] == entry["plan"]["streamed"]
            )
            entry["host_pinned_after_attach"] = host_pinned_stats()
            entry["store_pinning"] = store_pinning(eng)
            got = prompt_logits(model, ids, device)
            entry["logits"] = compare(ref_logits, got)
            entry["logits"]["top1_agreement"] = top1_agreement(ref_logits, got)
            decode(model, ids, args.warmup_tokens, device)
            eng.reset_stats()
            res = timed_decodes(model, ids, args.decode_steps, args.repeats, device)
            st = eng.stats()
            entry.update(res)
            entry["tokens_equal_baseline"] = res["tokens"] == base["tokens"]
            entry["tokens_agreement_baseline"] = sum(a == b for a, b in zip(res["tokens"], base["tokens"])) / len(
                base["tokens"]
            )
            entry["peak_allocated"] = peak_allocated(device)
            entry["planned_device_bytes"] = entry["plan"]["planned_device_bytes"]
            entry["peak_reserved"] = peak_reserved(device)
            entry["within_budget"] = None if entry["peak_allocated"] is None else entry["peak_allocated"] <= budget
            bpt = st.bytes_moved / st.forward_passes if st.forward_passes else 0.0
            ceiling = link_Bps / bpt if bpt else float("inf")
            bound = min(ceiling, base["tok_per_s"])
            entry.update(
                bytes_per_token=bpt,
                link_ceiling_tok_per_s=ceiling,
                fraction_of_link_ceiling=res["tok_per_s"] / ceiling,
                fraction_of_planner_prediction=res["tok_per_s"] / entry["planner"]["predicted_tok_s"]
                if entry["planner"]["predicted_tok_s"]
                else None,
                bound_tok_per_s=bound,
                fraction_of_bound=res["tok_per_s"] / bound,
                target_pass=(res["tok_per_s"] / ceiling >= TARGET_LINK_FRACTION) if mode == "bf16" else None,
                effective_link_GBps=bpt * res["tok_per_s"] / 1e9,
                hit_rate=st.hit_rate,
                hits=st.hits,
                misses=st.misses,
                stall_ms_per_token=st.stall_s * 1e3 / max(st.forward_passes, 1),
                forward_passes=st.forward_passes,
                engine={k: v for k, v in st.as_dict().items() if k != "layers"},
                layer_stall_ms=[round(lay.stall_s * 1e3, 3) for lay in st.layers],
            )
            log(
                f"{name}: {res['tok_per_s']:.2f} tok/s, {fmt_bytes(bpt)}/token, ceiling {ceiling:.2f} tok/s "
                f"({entry['fraction_of_link_ceiling']:.1%}), hit {st.hit_rate:.1%}, logits equal {entry['logits']['equal']}, "
                f"peak {fmt_bytes(entry['peak_allocated'])} / budget {fmt_bytes(budget)}"
            )
            t0 = time.perf_counter()
            tp.detach(model)
            entry["detach_s"] = time.perf_counter() - t0
            del eng
        except Exception as exc:  # noqa: BLE001 - record, keep the model usable, go on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            report["errors"].append({name: traceback.format_exc()})
            log(f"{name} FAILED: {entry['error']}")
            if tp.is_attached(model):
                tp.detach(model)
        p0, d0 = original_ffn[0]
        entry["detach_restored_original_weights"] = bool(p0.device == d0.device and torch.equal(p0.data, d0))
        for p, d in original_ffn:  # also frees the restored copies: host RAM holds one FFN copy
            p.data = d
        free_device_memory(device)
        last_run_s[mode] = time.perf_counter() - t_run
        entry["run_s"] = last_run_s[mode]
        save()

    report["host_pinned_end"] = host_pinned_stats()
    report["summary"] = summarize(report, same_la)
    if any(e.get("detach_restored_original_weights") is False for e in report["phases"].values()):
        report["engine_notes"] = [
            "detach() after attach(weight_quant=...) leaves the dequantized weights in the model, as documented "
            "(phase field detach_restored_original_weights=false); this script re-binds the original host FFN "
            "tensors after every run."
        ]
    save()
    print_table(report, link_Bps)
    log(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    return 0


def _version(dist: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(dist)
    except Exception:  # noqa: BLE001 - informational only
        return None


def summarize(report: dict[str, Any], same_la: int) -> dict[str, Any]:
    """The four targets, from the best lookahead of each format and at the same budget."""
    ph = report["phases"]

    def ok(e: dict[str, Any]) -> bool:
        return "tok_per_s" in e and "error" not in e and "skipped" not in e

    def best(fmt: str) -> dict[str, Any] | None:
        runs = [(n, e) for n, e in ph.items() if e.get("kind") == "torus" and e.get("format") == fmt and ok(e)]
        if not runs:
            return None
        n, e = max(runs, key=lambda x: x[1]["tok_per_s"])
        return {"run": n, "tok_per_s": e["tok_per_s"], "fraction_of_link_ceiling": e.get("fraction_of_link_ceiling")}

    def at(fmt: str, la: int) -> float | None:
        e = ph.get(f"torus_{fmt}_la{la}")
        return e["tok_per_s"] if e and ok(e) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    acc = ph.get("accelerate_offload")
    acc_tps = acc["tok_per_s"] if acc and ok(acc) else None
    b16, i8, i4 = best("bf16"), best("int8"), best("int4")
    out: dict[str, Any] = {
        "best": {"bf16": b16, "int8": i8, "int4": i4},
        "accelerate_tok_per_s": acc_tps,
        "bf16_fraction_of_link_ceiling": {
            n: e["fraction_of_link_ceiling"]
            for n, e in ph.items()
            if e.get("kind") == "torus" and e.get("format") == "bf16" and ok(e)
        },
        "bf16_vs_accelerate_same_budget": ratio(at("bf16", same_la), acc_tps),
        "bf16_best_vs_accelerate": ratio(b16 and b16["tok_per_s"], acc_tps),
        "int8_vs_bf16_best": ratio(i8 and i8["tok_per_s"], b16 and b16["tok_per_s"]),
        "int4_vs_bf16_best": ratio(i4 and i4["tok_per_s"], b16 and b16["tok_per_s"]),
        "int8_vs_bf16_same_lookahead": ratio(at("int8", same_la), at("bf16", same_la)),
        "int4_vs_bf16_same_lookahead": ratio(at("int4", same_la), at("bf16", same_la)),
    }

    def verdict(x: float | None, target: float) -> bool | None:
        return None if x is None else x >= target

    out["pass"] = {
        "bf16_link": verdict(b16 and b16["fraction_of_link_ceiling"], TARGET_LINK_FRACTION),
        "bf16_vs_accelerate": verdict(out["bf16_vs_accelerate_same_budget"], TARGET_VS_ACCELERATE),
        "int8_vs_bf16": verdict(out["int8_vs_bf16_best"], TARGET_INT8),
        "int4_vs_bf16": verdict(out["int4_vs_bf16_best"], TARGET_INT4),
    }
    return out


def print_table(report: dict[str, Any], link_Bps: float) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    bw = report["bandwidth"]
    title = (
        f"{report['device']}: Llama {report['model']['parameters'] / 1e9:.2f} B bf16, batch 1, "
        f"{s['decode_steps']} decode steps, median of {s['repeats']}; link {link_Bps / 1e9:.1f} GB/s "
        f"(one FFN layer {bw['ffn_layer']['GBps']:.1f} GB/s)"
    )
    t = Table(title=title)
    cols = (
        "run",
        "tok/s",
        "ms/tok",
        "resident/streamed",
        "bytes/tok",
        "ceiling tok/s",
        "planner tok/s",
        "% ceiling",
        "% min(ceil,base)",
        "hit",
        "stall ms/tok",
        "peak / budget",
        "logits (max|Δ|, top-1)",
        "tokens = base",
    )
    for c in cols:
        t.add_column(c, justify="left" if c == "run" else "right")
    n = report["settings"]["dims"]["num_hidden_layers"]
    for name, e in report["phases"].items():
        if "skipped" in e:
            t.add_row(name, "skipped", e["skipped"][:60], *[""] * (len(cols) - 3))
            continue
        if "error" in e:
            t.add_row(name, "ERROR", e["error"][:60], *[""] * (len(cols) - 3))
            continue
        peak_s = f"{fmt_bytes(e.get('peak_allocated'))} / {fmt_bytes(e.get('vram_budget'))}"
        if name == "baseline":
            t.add_row(
                name,
                f"{e['tok_per_s']:.2f}",
                f"{e['ms_per_token']:.1f}",
                f"{n}/0",
                "0",
                *["-"] * 6,
                f"{fmt_bytes(e['peak_allocated'])} / -",
                "reference",
                "reference",
            )
            continue
        if e.get("kind") == "accelerate":
            t.add_row(
                name,
                f"{e['tok_per_s']:.3f}",
                f"{e['ms_per_token']:.0f}",
                f"{len(e['offloaded_modules'])} modules offloaded",
                fmt_bytes(e["offloaded_bytes"]),
                *["-"] * 6,
                peak_s,
                f"{'equal' if e['logits']['equal'] else 'differ'} ({e['logits']['max_abs_diff']:.3g})",
                f"{e['decode_steps']} steps",
            )
            continue
        if e["peak_allocated"] is None:  # CPU: no allocator peak; show the engine's planned bytes
            peak_s = f"plan {fmt_bytes(e['planned_device_bytes'])} / {fmt_bytes(e['vram_budget'])}"
        lg = e["logits"]
        t.add_row(
            f"{name}",
            f"{e['tok_per_s']:.2f}",
            f"{e['ms_per_token']:.1f}",
            f"{len(e['plan']['resident'])}/{len(e['plan']['streamed'])}",
            fmt_bytes(e["bytes_per_token"]),
            f"{e['link_ceiling_tok_per_s']:.2f}",
            f"{e['planner']['predicted_tok_s']:.2f}",
            f"{e['fraction_of_link_ceiling']:.1%}"
            + (" ✓" if e["target_pass"] else (" ✗" if e["target_pass"] is False else "")),
            f"{e['fraction_of_bound']:.1%}",
            f"{e['hit_rate']:.1%}",
            f"{e['stall_ms_per_token']:.1f}",
            peak_s,
            f"{'equal' if lg['equal'] else 'differ'} ({lg['max_abs_diff']:.3g}, {lg['top1_agreement']:.0%})",
            "yes" if e["tokens_equal_baseline"] and e["tokens_consistent"] else f"{e['tokens_agreement_baseline']:.0%}",
        )
    console = Console(width=240)
    console.print(t)
    sm = report.get("summary") or {}
    if sm:

        def f(x: float | None, fmt: str = "{:.2f}x") -> str:
            return "n/a" if x is None else fmt.format(x)

        def v(b: bool | None) -> str:
            return "n/a" if b is None else ("PASS" if b else "FAIL")

        p = sm["pass"]
        b16 = sm["best"]["bf16"]
        console.print(
            "targets: "
            f"bf16 best {f(b16 and b16['fraction_of_link_ceiling'], '{:.1%}')} of link ceiling (>= 90%: {v(p['bf16_link'])}); "
            f"bf16/accelerate at the same budget {f(sm['bf16_vs_accelerate_same_budget'])} (>= 3x: {v(p['bf16_vs_accelerate'])}); "
            f"int8/bf16 {f(sm['int8_vs_bf16_best'])} (>= 1.8x: {v(p['int8_vs_bf16'])}); "
            f"int4/bf16 {f(sm['int4_vs_bf16_best'])} (>= 3x: {v(p['int4_vs_bf16'])})"
        )
    pinned = report.get("host_pinned_end")
    if pinned:
        console.print(f"pinned host memory (torch host allocator): {pinned}")
    for note in report.get("engine_notes") or []:
        console.print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
