"""llama.cpp as a peer on the same weights: convert a checkpoint to GGUF and time its decode.

llama.cpp lives in its own virtual environment (`--peer-python`), never a project dependency:
build it as ../shared/notes/llama-cpp-peer.md says (llama-cpp-python 0.3.36 without AMX). Its
converter, `convert_hf_to_gguf.py`, with the `conversion/` and `gguf-py/` packages beside it, comes
from the llama.cpp sources (`--llama-cpp-src`: e.g. `vendor/llama.cpp` of the llama-cpp-python
sdist) and runs with this environment's Python (it needs torch, numpy and transformers).

Formats: Q8_0 straight from the converter (`--outtype q8_0`); Q4_K_M quantized from that Q8_0
with `llama_model_quantize` (`allow_requantize`: the disk here has no room for a bf16 GGUF beside
the checkpoint; the codes differ slightly from a bf16 source's, the bytes and speed do not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: Runs in the peer's environment: load, warm up, then a timed greedy completion from a clean KV
#: cache (prefill included, as the torus rows time `generate`). Prints one JSON line.
MEASURE = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def memory():
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out
t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False, seed=0)
load_s = time.perf_counter() - t0
after_load = memory()
llm.create_completion(prompt, max_tokens=1, temperature=0.0, top_k=1)
llm.reset()
t1 = time.perf_counter()
tokens = []
for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, stream=True):
    if chunk["choices"][0]["finish_reason"] is None:  # the last chunk only says why it stopped
        tokens.append(chunk["choices"][0]["text"])
decode_s = time.perf_counter() - t1
print(json.dumps({"load_s": load_s, "tok_s": len(tokens) / decode_s, "n_tokens": len(tokens),
                  "after_load": after_load, "after_decode": memory(), "threads": threads}))
"""

QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.allow_requantize = True
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def convert(checkpoint: Path, src: Path, peer_python: str, out_dir: Path, formats: list[str]) -> dict[str, Path]:
    """GGUF files of `checkpoint` in `formats` ("q8_0", "q4_k"), written to `out_dir`."""
    out: dict[str, Path] = {}
    q8 = out_dir / "model-q8_0.gguf"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    subprocess.run(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(checkpoint),
            "--outtype",
            "q8_0",
            "--outfile",
            str(q8),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    if "q8_0" in formats:
        out["q8_0"] = q8
    if "q4_k" in formats:
        q4 = out_dir / "model-q4_k.gguf"
        subprocess.run([peer_python, "-c", QUANTIZE, str(q8), str(q4)], check=True, capture_output=True)
        out["q4_k"] = q4
    return out


def measure(peer_python: str, gguf: Path, prompt: str, new_tokens: int, timeout: float) -> dict:
    """One llama.cpp run in its own process (so peak RSS is its own)."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    try:
        res = subprocess.run(
            [peer_python, "-c", MEASURE, str(gguf), prompt, str(new_tokens), str(threads)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["gguf_bytes"] = gguf.stat().st_size
    return out
