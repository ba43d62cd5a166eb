"""The peer on the same machine: llama.cpp's CPU decode against torus-sparse with every FFN on the host.

Model: the embedded SmolLM2-135M-Instruct. llama.cpp reads its GGUF as shipped (Q4_1 weights);
torus-sparse loads the same GGUF through transformers (dequantized to fp32), attaches with the copy
transport, no resident FFN layer and `host_compute="all"`, so every decode pass computes every FFN
layer on the host threads, in int4 (the same 4-bit weight class as Q4_1) or int8. Streaming-only
int4 and the plain model are measured beside them, and the plain and host-int4 runs once more with
the model in bf16 (its resident attention, norms and LM head then read half the bytes), with a
host-bf16 run (FFN weights as loaded in bf16, through torus-sparse's bf16 kernel). Decoding:
the chat prompt, greedy, batch 1, `--tokens` new tokens; tok/s = decode steps ÷ time between the
first and last token (prefill excluded) for both. `--threads` for both (llama.cpp `n_threads`, torch `set_num_threads`).

llama.cpp runs in its own virtual environment (`--peer-python`, never a project dependency):
build it as `../shared/notes/llama-cpp-peer.md` says, e.g.

  python3 -m venv .venv-llamacpp
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-llamacpp/bin/pip install llama-cpp-python==0.3.36   # ~20 min

Where torus-sparse's time goes: per decode step, the host FFN seconds (engine stats), the LM head
(one token through `lm_head`, timed alone), the attention projections (one token through each
layer's q, k, v, o, timed alone) and the rest (norms, rotary embeddings, the KV cache, attention's
own ops, embeddings, Python and generate()'s own work; also per decoder layer); and the ratio
host-int4 would reach if its host FFNs took no time (what the rest of the step allows). This
machine's speed drifts over minutes, so host-int4 runs between two llama.cpp runs and each ratio is
to their mean. Target: host-int4 decode >= 0.5 x llama.cpp's.

Run:  python benchmarks/llama_cpp_peer.py [--tokens 48] [--repeats 3] [--record | --out PATH]
Writes benchmarks/results/scratch/llama_cpp_peer.json (--record: benchmarks/results/llama_cpp_peer.json).
About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import harness
import torch

import torus_plugins as tp

TARGET = 0.5
PEER_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, messages, n, threads, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_threads=threads, n_ctx=1024, verbose=False, seed=0)
runs = []
for r in range(repeats + 1):  # the first is a warm-up
    times, text = [], []
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=n, temperature=0.0, top_k=1, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            times.append(time.perf_counter())
            text.append(delta)
    if r:
        runs.append({"pieces": len(times), "tok_per_s": (len(times) - 1) / (times[-1] - times[0]), "text": "".join(text)})
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__, "runs": runs}))
"""

_HOST_INT4 = dict(transport="copy", resident_layers=0, weight_quant="int4", host_compute="all", host_max_tokens=1)
#: name -> (the model's dtype: its resident attention, norms and LM head; the engine's settings or None).
#: host-int4 (the target's row) first: it runs between two llama.cpp runs (`main`).
VARIANTS = {
    "host-int4": (torch.float32, _HOST_INT4),
    "plain": (torch.float32, None),
    "stream-int4": (torch.float32, dict(transport="copy", resident_layers=0, weight_quant="int4")),
    "host-int8": (
        torch.float32,
        dict(transport="copy", resident_layers=0, weight_quant="int8", host_compute="all", host_max_tokens=1),
    ),
    "host-fp32": (torch.float32, dict(transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1)),
    # The same model in bf16: its resident matmuls and LM head read half the bytes through PyTorch's
    # bf16 GEMV (slower per byte than its fp32 one here); its host FFNs fuse as in fp32, rounding
    # between ops as the bf16 model does. host-bf16: the FFN weights as loaded, our bf16 kernel.
    "plain-bf16": (torch.bfloat16, None),
    "host-int4-bf16": (torch.bfloat16, _HOST_INT4),
    "host-bf16": (torch.bfloat16, dict(transport="copy", resident_layers=0, host_compute="all", host_max_tokens=1)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per generation (default 48)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant, after a warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument(
        "--peer-python",
        type=Path,
        default=harness.REPO / ".venv-llamacpp" / "bin" / "python",
        help="python of the virtual environment that has llama-cpp-python (default .venv-llamacpp)",
    )
    harness.add_output_args(ap, "llama_cpp_peer.json")
    return ap.parse_args(argv)


def run_peer(args: argparse.Namespace, gguf: Path) -> dict:
    if not args.peer_python.exists():
        return {"error": f"{args.peer_python} not found: build llama-cpp-python as this script's docstring says"}
    cmd = [
        str(args.peer_python),
        "-c",
        PEER_SCRIPT,
        str(gguf),
        json.dumps(harness.SKY_MESSAGES),
        str(args.tokens),
        str(args.threads),
        str(args.repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["tok_per_s"] = harness.median(r["tok_per_s"] for r in out["runs"])
    return out


def lm_head_s(model, inputs) -> float:
    """One token's hidden state through the LM head, best of 20 (the model's own head, resident)."""
    head = model.get_output_embeddings()
    h = torch.randn(1, 1, head.weight.shape[1], dtype=head.weight.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(20):
            t0 = time.perf_counter()
            head(h)
            best = min(best, time.perf_counter() - t0)
    return best


def attention_linears_s(model) -> float:
    """One token through every attention projection (q, k, v, o of each layer: resident linears
    under a `self_attn`), best of 20: what attention's weight reads cost, apart from its other ops."""
    lins = [m for n, m in model.named_modules() if ".self_attn." in f".{n}" and isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in lins]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(20):
            t0 = time.perf_counter()
            for m, x in zip(lins, xs):
                m(x)
            best = min(best, time.perf_counter() - t0)
    return best


def run_torus(args: argparse.Namespace, path: Path, inputs, pad_id, tok, names: list[str]) -> dict:
    out = {}
    for name in names:
        dtype, kw = VARIANTS[name]
        harness.log(f"torus-sparse {name}")
        model = harness.load_in_memory(path, dtype)
        engine = tp.attach(model, **kw) if kw else None
        harness.generate_once(model, inputs, 8, pad_id)
        runs = []
        for _ in range(args.repeats):
            if engine is not None:
                engine.reset_stats()
            g = harness.timed_generate(model, inputs, args.tokens, pad_id)
            rates = g.rates()
            if engine is not None:
                s = engine.stats()
                rates["host_ffn_s_per_step"] = s.host_s / max(1, g.steps)
                rates["bytes_moved"] = s.bytes_moved
            runs.append(rates)
        tps = harness.median(r["tok_per_s"] for r in runs)
        entry = {
            "dtype": str(dtype).removeprefix("torch."),
            "config": kw,
            "tok_per_s": tps,
            "text": tok.decode(runs[0]["tokens"], skip_special_tokens=True),
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
        }
        if engine is not None and engine.host_plan is not None:
            entry["host_plan"] = engine.host_plan.as_dict()
            step = 1.0 / tps
            ffn = harness.median(r["host_ffn_s_per_step"] for r in runs)
            head = lm_head_s(model, inputs)
            attn = attention_linears_s(model)
            rest = step - ffn - head - attn
            entry["time_per_step_s"] = {
                "total": step,
                "host_ffn": ffn,
                "lm_head": head,
                "attention_linears": attn,
                "rest": rest,
                # norms, rotary embeddings, the KV cache, attention's own ops, residual adds, the
                # engine's and transformers' Python, per decoder layer
                "rest_per_layer": rest / model.config.num_hidden_layers,
            }
            # The decode rate if the host FFNs took no time at all: what the rest of the step allows
            entry["tok_per_s_without_ffn"] = 1.0 / (step - ffn)
        out[name] = entry
        del model, engine
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = harness.begin(args, "llama_cpp_peer.json", threads=args.threads)
    from transformers import AutoTokenizer

    from torus_adapters.transformers_adapter.default_model import default_model_path, gguf_path

    path = default_model_path()
    gguf = gguf_path()
    inputs, pad_id = harness.chat_prompt(path)
    tok = AutoTokenizer.from_pretrained(path)
    # This machine's speed drifts over minutes: the target's row runs between two llama.cpp runs,
    # and every ratio is to their mean.
    harness.log(f"llama.cpp on {gguf.name}")
    before = run_peer(args, gguf)
    ours = run_torus(args, path, inputs, pad_id, tok, ["host-int4"])
    harness.log(f"llama.cpp on {gguf.name} again")
    after = run_peer(args, gguf)
    ours.update(run_torus(args, path, inputs, pad_id, tok, [n for n in VARIANTS if n != "host-int4"]))
    peer = dict(before)
    if "error" not in before and "error" not in after:
        peer["runs"] = before["runs"] + after["runs"]
        peer["tok_per_s_before"], peer["tok_per_s_after"] = before["tok_per_s"], after["tok_per_s"]
        peer["tok_per_s"] = (before["tok_per_s"] + after["tok_per_s"]) / 2
    elif "error" in after:
        peer = dict(after)
    peer_tps = peer.get("tok_per_s")
    t = harness.table(
        f"Decode at batch 1, {args.threads} threads, {args.tokens} tokens",
        ["engine", "weights", "tok/s", "÷ llama.cpp", "text"],
    )
    if peer_tps:
        t.add_row("llama.cpp " + peer["version"], "Q4_1 (all)", f"{peer_tps:.1f}", "1.00", peer["runs"][0]["text"][:60])
    else:
        t.add_row("llama.cpp", "-", "-", "-", peer.get("error", "?")[:80])
    for name, e in ours.items():
        ratio = e["tok_per_s"] / peer_tps if peer_tps else None
        e["ratio_to_llama_cpp"] = ratio
        ffn = (e["config"] or {}).get("weight_quant")
        weights = e["dtype"] if not ffn else f"{e['dtype']}, {ffn} FFN"
        t.add_row(
            f"torus-sparse {name}",
            weights,
            f"{e['tok_per_s']:.1f}",
            "-" if ratio is None else f"{ratio:.2f}",
            e["text"][:60],
        )
    harness.show(t)
    bf16 = ours["host-int4-bf16"].get("ratio_to_llama_cpp")
    if bf16 is not None:
        harness.log(f"host-int4 with the model in bf16 ÷ llama.cpp = {bf16:.3f}")
    h = ours["host-int4"]
    ratio = h.get("ratio_to_llama_cpp")
    verdict = None if ratio is None else ratio >= TARGET
    harness.log(
        f"host-int4 ÷ llama.cpp = {ratio if ratio is None else round(ratio, 3)} (target {TARGET}): {harness.pass_fail(verdict)}"
    )
    if peer_tps:
        harness.log(
            f"llama.cpp {peer['tok_per_s_before']:.1f} tok/s before host-int4, {peer['tok_per_s_after']:.1f} after"
        )
    ceiling = None
    if "time_per_step_s" in h:
        harness.log(
            "host-int4 per step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in h["time_per_step_s"].items())
        )
        if peer_tps:
            ceiling = h["tok_per_s_without_ffn"] / peer_tps
            harness.log(f"host-int4 with its host FFNs taking no time would be {ceiling:.3f} x llama.cpp")
    report = {
        **harness.environment(threads=args.threads),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "target_ratio": TARGET,
        "llama_cpp": peer,
        "torus_sparse": ours,
        "host_int4_ratio": ratio,
        "host_int4_ratio_without_ffn": ceiling,
        "pass": verdict,
    }
    harness.log(f"wrote {run.save(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
