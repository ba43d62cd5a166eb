"""Real sizes: load, quantize and decode checkpoints of 3B-30B-class shapes within host RAM.

Builds random-init checkpoints (bf16, the Hub's on-disk layout: MoE experts as per-expert tensors)
tensor by tensor in a temp folder -- a model is never built in memory to be saved -- then runs each
configuration in a fresh process (so peak RSS is that run's own) and deletes what it built:

- plain: `AutoModelForCausalLM.from_pretrained(dtype="auto")`, no torus-sparse;
- streamed int8 / int4: the lean loader (`lean_load.load_lean`: the model built without its FFN
  weights, attach reading each FFN tensor or expert from the checkpoint as it quantizes it) + attach,
  copy transport, nothing resident, first with an empty store cache (quantizing and writing the
  store) and again with it (mapping the store);
- int4 host: the same with every FFN layer (or missed expert) computed on the host at decode;
- llama.cpp Q8_0 / Q4_K (rows `llama.cpp-q8_0`, `llama.cpp-q4_k`, with `--peer-python` and
  `--llama-cpp-src`): the same checkpoint converted by llama.cpp's own converter, loaded and decoded
  by llama-cpp-python in its own environment (`harness/llama_cpp.py`), the same prompt and token
  count, greedy, from a clean KV cache.

Per run: load seconds (model load + attach), attach seconds alone, peak RSS (VmHWM) and RSS after
decoding, anonymous and file-backed, each ÷ the checkpoint's bytes, and peak ÷ (host store bytes
+ non-FFN bytes) -- the issue's bound is 1.1 --, decode tok/s over a 16-token greedy generate, and how many of the 16
tokens equal the plain model's (random weights make weak text: a reference, not a target; the
quantized rows' exact check is tests/test_store_file.py and test_quant.py).

Shapes: "3b" (Llama-3.2-3B: 28 layers, hidden 3072, intermediate 8192), "olmoe8" (OLMoE-1B-7B cut
to 8 layers: 64 experts of 1024, top-8), "olmoe" (all 16 layers), "30b-a3b" (Qwen3-30B-A3B: 48
layers, 128 experts of 768, top-8; 61 GB). Vocabulary 49152 (the embedded model's tokenizer).
What is not run and why is printed and recorded, not skipped silently: a plain row whose bf16 load
(transformers stacks MoE experts into anonymous memory) would exceed `--ram-limit`; a cached pass
(and the store file) when the disk has no room for the store beside the checkpoint.

Weights: N(0, 0.02) drawn once into a 64 MiB pool, each tensor a copy of the pool from its own
random offset (norms 1): a 61 GB checkpoint is written at disk speed instead of `normal_`'s
~0.1 GB/s here, and no two tensors (or experts) are equal.

Run:  python benchmarks/scale.py [--shapes 3b,olmoe8] [--rows plain,int8,int4,int4-host] [--record | --out PATH]
Writes benchmarks/results/scratch/scale.json; with --record benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # sets the offline defaults before anything loads
import torch
from harness.record import REPO, add_output_args, begin, environment
from harness.report import fmt_bytes, log, show, table

NEW_TOKENS = 16
PROMPT = "The history of the river valley begins"
#: Settings per shape for the streamed rows. On the CPU the copy transport's "device" is host
#: memory too: an unbounded expert cache would hold every expert dequantized beside its codes, so
#: MoE shapes get a budget (non-FFN weights + KV + a cache of 0.5-1 GiB).
SHAPE_OPTIONS = {
    "olmoe8": {"vram_budget": "2GiB"},
    "olmoe": {"vram_budget": "2.5GiB"},
    "30b-a3b": {"vram_budget": "2.75GiB"},
}
#: Rows a shape runs, when not all (the 30B-A3B: one quantized load, ~15 minutes each here; its
#: int8 store, 27 GiB, is over this machine's RAM and the disk has no room for it beside the checkpoint).
SHAPE_ROWS = {"30b-a3b": ("plain", "int4")}
#: Store bytes per bf16 FFN byte (int8: a byte a weight plus scales; int4: half a byte plus scales).
STORE_RATIO = {"int8": 0.51, "int4": 0.27}
ROWS = {
    "plain": None,
    "int8": dict(transport="copy", resident_layers=0, weight_quant="int8"),
    "int4": dict(transport="copy", resident_layers=0, weight_quant="int4"),
    "int4-host": dict(transport="copy", resident_layers=0, weight_quant="int4", host_compute="all", host_max_tokens=1),
}


#: The peer's rows: llama.cpp on the same weights in its own format class.
PEER_ROWS = {"llama.cpp-q8_0": "q8_0", "llama.cpp-q4_k": "q4_k"}


def shape_config(name: str):
    import transformers as T

    common = dict(vocab_size=49152, max_position_embeddings=4096, torch_dtype="bfloat16")
    if name == "3b":
        return T.LlamaConfig(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            **common,
        )
    if name == "tiny":  # a smoke test of the script itself
        return T.LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, **common
        )
    if name in ("olmoe8", "olmoe"):
        return T.OlmoeConfig(
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=8 if name == "olmoe8" else 16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            **common,
        )
    if name == "30b-a3b":
        return T.Qwen3MoeConfig(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            **common,
        )
    raise SystemExit(f"unknown shape {name!r}: use 3b, olmoe8, olmoe or 30b-a3b")


def _hub_tensors(name: str, meta: torch.Tensor):
    """The on-disk names and shapes of one model tensor: transformers 5 fuses MoE experts at load
    (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`); the Hub keeps one tensor per expert."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base, (E, two_i, H) = name[: -len("gate_up_proj")], meta.shape
        for e in range(E):
            yield f"{base}{e}.gate_proj.weight", (two_i // 2, H)
            yield f"{base}{e}.up_proj.weight", (two_i // 2, H)
    elif name.endswith("mlp.experts.down_proj"):
        base, (E, H, inter) = name[: -len("down_proj")], meta.shape
        for e in range(E):
            yield f"{base}{e}.down_proj.weight", (H, inter)
    else:
        yield name, tuple(meta.shape)


#: elements of the random pool every weight is copied from (64 MiB of bf16)
POOL = 32 * 1024 * 1024


def _fill_from_pool(t: torch.Tensor, pool: torch.Tensor, start: int) -> None:
    """`t` <- the pool read from `start`, wrapping around (a memcpy, not a random draw)."""
    flat, done = t.view(-1), 0
    while done < flat.numel():
        n = min(flat.numel() - done, pool.numel() - start)
        flat[done : done + n] = pool[start : start + n]
        done, start = done + n, 0


def build_checkpoint(cfg, out: Path) -> int:
    """Write a random bf16 checkpoint of `cfg` to `out` one shard per decoder layer, each tensor
    made and written on its own (norms 1, the rest N(0, 0.02)); returns its bytes."""
    import transformers as T
    from safetensors.torch import save_file

    from torus_adapters.transformers_adapter.default_model import default_model_path

    out.mkdir(parents=True)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    names = [(n, t) for n, t in model.state_dict().items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    shards: dict[str, list] = {}
    for n, t in names:
        key = n.split(".")[2] if n.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append((n, t))
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
    weight_map, total = {}, 0
    for i, items in enumerate(shards.values()):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n, meta in items:
            for hub, shape in _hub_tensors(n, meta):
                t = torch.empty(shape, dtype=torch.bfloat16)
                if "norm" in hub:
                    t.fill_(1.0)
                else:
                    _fill_from_pool(t, pool, int(torch.randint(POOL, (), generator=gen)))
                tensors[hub] = t
                weight_map[hub] = fname
                total += t.numel() * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(out)
    tok = default_model_path()
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return total


def memory() -> dict[str, int]:
    """This process's VmHWM (peak), RssAnon and RssFile, bytes."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def measure(path: str, row: str, cache: str, options: dict) -> dict:
    """One run, in this (fresh) process: load, decode, memory. `cache` "" = no store file."""
    import transformers as T

    import torus_plugins as tp
    from torus_adapters.transformers_adapter.lean_load import load_lean

    tok = T.AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    before_load = memory()  # the interpreter, torch and transformers: what no model size changes
    t0 = time.perf_counter()
    attach_s = None
    if ROWS[row] is None:
        model = T.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    else:
        model = load_lean(path)
        t_attach = time.perf_counter()
        tp.attach(model, tp.TorusConfig(store_cache=cache or None, **ROWS[row], **options))
        attach_s = time.perf_counter() - t_attach
    load_s = time.perf_counter() - t0
    after_load = memory()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False)  # warm: prefill and first step
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        decode_s = time.perf_counter() - t1
    result = {
        "load_s": load_s,
        "attach_s": attach_s,
        "tok_s": NEW_TOKENS / decode_s,
        "tokens": out[0, ids.shape[1] :].tolist(),
        "before_load": before_load,
        "after_load": after_load,
        "after_decode": memory(),
    }
    if ROWS[row] is not None:
        engine = tp.get_engine(model)
        stats = engine.stats()
        result["ineffective"] = list(stats.ineffective)
        result["host_calls"] = stats.host_calls
        # The bound: peak RSS <= 1.1 x (host store + non-FFN bytes).
        result["store_bytes"] = engine.store.nbytes + (engine.experts.store.nbytes if engine.experts else 0)
        result["non_ffn_bytes"] = engine.non_ffn_bytes
        # On the CPU the "device" is host memory too: the ring's slots and the expert cache.
        result["device_buffer_bytes"] = engine.plan.ring_bytes + (engine.expert_plan.nbytes if engine.experts else 0)
        result["options"] = options
    return result


def run_row(path: Path, row: str, cache: Path | None, options: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--_measure", json.dumps([str(path), row, str(cache or ""), options])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1][:300]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes", default="3b,olmoe8", help="comma-separated: 3b, olmoe8, olmoe, 30b-a3b (tiny: a smoke test)"
    )
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {', '.join([*ROWS, *PEER_ROWS])}")
    ap.add_argument("--peer-python", help="the Python of a llama-cpp-python environment (llama.cpp rows)")
    ap.add_argument(
        "--llama-cpp-src", type=Path, help="llama.cpp sources with convert_hf_to_gguf.py and gguf-py (llama.cpp rows)"
    )
    ap.add_argument("--ram-limit", default="20GiB", help="refuse a run whose estimated peak exceeds this")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    ap.add_argument(
        "--workdir",
        help="reuse checkpoints found here and keep them; others are built here and deleted after each shape "
        "(default: a temporary folder, deleted after)",
    )
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    add_output_args(ap, "scale.json")
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(*json.loads(args._measure))))
        return 0
    from torus_plugins.config import parse_bytes

    ram_limit = parse_bytes(args.ram_limit, "--ram-limit")
    run = begin(args, "scale.json")
    report: dict = {"shapes": {}, "new_tokens": NEW_TOKENS}
    keep = args.workdir is not None
    work = (
        Path(args.workdir)
        if keep
        else Path(tempfile.mkdtemp(prefix="torus-scale-", dir=os.environ.get("TORUS_SCALE_DIR")))
    )
    work.mkdir(parents=True, exist_ok=True)
    try:
        for shape in args.shapes.split(","):
            cfg = shape_config(shape)
            path, cache = work / shape, work / f"{shape}-stores"
            free = shutil.disk_usage(work).free
            index = path / "model.safetensors.index.json"
            t0 = time.perf_counter()
            built = not (keep and index.is_file())
            if not built:
                log(f"{shape}: reusing the checkpoint in {path}")
                nbytes = json.loads(index.read_text())["metadata"]["total_size"]
            else:
                log(f"{shape}: building the checkpoint in {path} ({fmt_bytes(free)} free on that disk)")
                shutil.rmtree(path, ignore_errors=True)
                nbytes = build_checkpoint(cfg, path)
            entry: dict = {"checkpoint_bytes": nbytes, "build_s": time.perf_counter() - t0, "runs": {}}
            report["shapes"][shape] = entry
            moe = getattr(cfg, "num_experts", None) is not None
            options = SHAPE_OPTIONS.get(shape, {})
            ggufs: dict | None = None
            rows = args.rows.split(",")
            for row in rows:
                if row in PEER_ROWS:
                    if shape in SHAPE_ROWS:
                        continue
                    if not (args.peer_python and args.llama_cpp_src):
                        entry["runs"][row] = {"error": "not run: needs --peer-python and --llama-cpp-src"}
                        continue
                    if ggufs is None:
                        log(f"{shape}: converting to GGUF with llama.cpp's converter")
                        from harness import llama_cpp

                        (work / f"{shape}-gguf").mkdir(exist_ok=True)
                        t_conv = time.perf_counter()
                        ggufs = llama_cpp.convert(
                            path, args.llama_cpp_src, args.peer_python, work / f"{shape}-gguf", list(PEER_ROWS.values())
                        )
                        entry["gguf_convert_s"] = time.perf_counter() - t_conv
                    log(f"{shape}: {row}")
                    from harness import llama_cpp

                    entry["runs"][row] = llama_cpp.measure(
                        args.peer_python, ggufs[PEER_ROWS[row]], PROMPT, NEW_TOKENS, args.timeout
                    )
                    run.save({**environment(), **report})
                    if not any(r in PEER_ROWS for r in rows[rows.index(row) + 1 :]):
                        shutil.rmtree(work / f"{shape}-gguf", ignore_errors=True)  # disk for the next rows
                    continue
                if row not in SHAPE_ROWS.get(shape, ROWS):
                    continue
                quant = (ROWS[row] or {}).get("weight_quant")
                if ROWS[row] is None and moe and 1.1 * nbytes > ram_limit:
                    # transformers stacks the bf16 experts into anonymous memory while loading
                    entry["runs"][row] = {
                        "error": f"not run: loading stacks {fmt_bytes(nbytes)} of bf16 experts in anonymous memory "
                        f"(over --ram-limit {fmt_bytes(ram_limit)})"
                    }
                    continue
                passes = ["first", "cached"] if quant else [""]
                store_fits = not quant or shutil.disk_usage(work).free > 1.2 * STORE_RATIO[quant] * nbytes
                for p in passes:
                    name = f"{row} ({p})" if p else row
                    if p == "cached" and not store_fits:
                        entry["runs"][name] = {
                            "error": f"not run: no room on the disk for a {quant} store file beside the checkpoint "
                            f"({fmt_bytes(shutil.disk_usage(work).free)} free)"
                        }
                        continue
                    log(f"{shape}: {name}")
                    if p == "first":
                        shutil.rmtree(cache, ignore_errors=True)
                    entry["runs"][name] = run_row(path, row, cache if store_fits else None, options, args.timeout)
                    run.save({**environment(), **report})
            if built:  # what this run built goes (disk space); a reused checkpoint stays
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / f"{shape}-gguf", ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    out = run.save({**environment(), **report})

    t = table(
        "scale: random-init checkpoints, this machine",
        [
            "shape",
            "run",
            "load s",
            "attach s",
            "peak RSS ÷ ckpt",
            "peak ÷ (store + non-FFN)",
            "(peak − base) ÷ (+ ring/cache)",
            "anon / file after decode",
            "tok/s",
            "= plain",
        ],
        left=2,
    )
    for shape, entry in report["shapes"].items():
        ck = entry["checkpoint_bytes"]
        plain = entry["runs"].get("plain", {}).get("tokens")
        for name, r in entry["runs"].items():
            if "error" in r:
                t.add_row(shape, name, r["error"][:90], "", "", "", "", "", "", "")
                continue
            mem = r["after_decode"]
            same = (
                ""
                if plain is None or "tokens" not in r
                else f"{sum(a == b for a, b in zip(r['tokens'], plain))}/{NEW_TOKENS}"
            )
            t.add_row(
                shape,
                name,
                f"{r['load_s']:.1f}",
                "" if r.get("attach_s") is None else f"{r['attach_s']:.1f}",
                f"{mem['VmHWM'] / ck:.2f}",
                f"{mem['VmHWM'] / (r['store_bytes'] + r['non_ffn_bytes']):.2f}" if "store_bytes" in r else "",
                f"{(mem['VmHWM'] - r['before_load']['VmHWM']) / (r['store_bytes'] + r['non_ffn_bytes'] + r['device_buffer_bytes']):.2f}"
                if "device_buffer_bytes" in r
                else "",
                f"{fmt_bytes(mem['RssAnon'])} / {fmt_bytes(mem['RssFile'])}",
                f"{r['tok_s']:.2f}",
                same,
            )
    sizes = ", ".join(f"{name} {fmt_bytes(e['checkpoint_bytes'])}" for name, e in report["shapes"].items())
    show(t, f"checkpoints: {sizes}; load average before {run.loadavg_before[0]:.1f}; written to {out}")
    return 0


if __name__ == "__main__":
    assert harness and REPO
    sys.exit(main())
