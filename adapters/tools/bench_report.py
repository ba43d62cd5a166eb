"""Results of `torus-sparse bench`: per-variant numbers, and the table, JSON and chart made of them."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torus_plugins.config import format_bytes


# ---------------------------------------------------------------------- results
@dataclass
class Run:
    """One timed generation (plus the engine's counters for it, when there is an engine)."""

    tokens: list[int]
    prompt_tokens: int
    ttft_s: float
    decode_s: float
    total_s: float
    engine: dict[str, Any] | None = None

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else math.inf

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s


@dataclass
class VariantResult:
    name: str
    kind: str
    status: str = "ok"  # "ok", "skipped" or "failed"
    reason: str | None = None
    method: str | None = None
    config: dict[str, Any] | None = None
    decode_tok_s: float | None = None
    ttft_s: float | None = None
    prefill_tok_s: float | None = None
    peak_device_bytes: int | None = None
    bytes_per_token: float | None = None
    hit_rate: float | None = None
    link_ceiling_tok_s: float | None = None
    pct_of_ceiling: float | None = None
    predicted_tok_s: float | None = None
    text_equal: bool | None = None
    lossy: bool = False
    text: str | None = None
    tokens: list[int] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(res: VariantResult, runs: list[Run]) -> None:
    """Fill the timing fields from the (lower) median run, and the engine's totals over all runs."""
    order = sorted(runs, key=lambda r: r.decode_tok_s)
    mid = order[(len(order) - 1) // 2]
    res.decode_tok_s = mid.decode_tok_s
    res.ttft_s = statistics.median(r.ttft_s for r in runs)
    res.prefill_tok_s = statistics.median(r.prefill_tok_s for r in runs)
    res.tokens = runs[0].tokens
    res.extra["tokens_consistent"] = all(r.tokens == runs[0].tokens for r in runs)
    res.runs = [
        {
            "decode_tok_s": r.decode_tok_s,
            "ttft_s": r.ttft_s,
            "prefill_tok_s": r.prefill_tok_s,
            "total_s": r.total_s,
            **({"engine": r.engine} if r.engine else {}),
        }
        for r in runs
    ]
    engines = [r.engine for r in runs if r.engine]
    if engines:
        hits, misses = sum(e["hits"] for e in engines), sum(e["misses"] for e in engines)
        new_tokens = sum(len(r.tokens) for r in runs)
        res.bytes_per_token = sum(e["bytes_moved"] for e in engines) / new_tokens
        res.hit_rate = hits / (hits + misses) if hits + misses else None  # nothing streamed
        res.extra["stall_ms_per_token"] = sum(e["stall_s"] for e in engines) * 1e3 / new_tokens


def apply_ceiling(res: VariantResult, bandwidth_bps: float) -> None:
    """Link ceiling = bandwidth / bytes moved per token; % = measured decode / ceiling."""
    if res.status != "ok" or res.bytes_per_token is None or res.decode_tok_s is None:
        return
    if res.bytes_per_token <= 0:
        res.extra["ceiling_note"] = "nothing streams: compute-bound, no link ceiling"
        return
    res.link_ceiling_tok_s = bandwidth_bps / res.bytes_per_token
    res.pct_of_ceiling = 100.0 * res.decode_tok_s / res.link_ceiling_tok_s


def compare_texts(results: list[VariantResult]) -> str | None:
    """Mark each variant's tokens equal (or not) to the reference: the baseline, else the first
    lossless variant that ran, else the first that ran. Returns the reference's name."""
    ran = [r for r in results if r.status == "ok" and r.tokens is not None]
    if not ran:
        return None
    ref = next((r for r in ran if r.kind == "baseline"), None) or next((r for r in ran if not r.lossy), ran[0])
    for r in ran:
        r.text_equal = r.tokens == ref.tokens
    return ref.name


# ---------------------------------------------------------------------- report
@dataclass
class BenchReport:
    header: dict[str, Any]
    variants: list[VariantResult]
    reference: str | None = None
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.header)
        d.update(reference=self.reference, wall_s=self.wall_s, variants=[asdict(v) for v in self.variants])
        return _finite(d)


def _finite(x: Any) -> Any:
    """JSON has no inf/NaN: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(report: BenchReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    return path


def _num(x: float | None, fmt: str, missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def text_cell(v: VariantResult, reference: str | None) -> str:
    if v.status != "ok":
        return v.status
    if v.name == reference:
        return "ref"
    if v.lossy:
        return "n/a (lossy)"
    return "yes" if v.text_equal else "NO"


def render_table(report: BenchReport) -> Any:
    from rich import box
    from rich.table import Table

    h, st = report.header, report.header["settings"]
    t = Table(
        title=f"{h['model']['name']} on {h['device']}: budget {format_bytes(st['budget_bytes'])}, "
        f"link {st['bandwidth_bps'] / 1e9:.1f} GB/s ({st['transport']}), {st['tokens']} tokens × {st['repeats']} runs",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("variant", no_wrap=True)
    for c in (
        "decode\ntok/s",
        "TTFT\nms",
        "prefill\ntok/s",
        "peak\ndevice",
        "bytes\n/token",
        "hit\nrate",
        "ceiling\ntok/s",
        "% of\nceiling",
        "plan\ntok/s",
        f"text =\n{report.reference or 'ref'}",
    ):
        t.add_column(c, justify="right", no_wrap=True)
    for v in report.variants:
        t.add_row(
            v.name,
            _num(v.decode_tok_s, ".1f"),
            _num(None if v.ttft_s is None else v.ttft_s * 1e3, ".0f"),
            _num(v.prefill_tok_s, ".0f"),
            "-" if v.peak_device_bytes is None else format_bytes(v.peak_device_bytes),
            "-" if v.bytes_per_token is None else format_bytes(v.bytes_per_token),
            "-" if v.hit_rate is None else f"{v.hit_rate:.1%}",
            _num(v.link_ceiling_tok_s, ".1f"),
            "-" if v.pct_of_ceiling is None else f"{v.pct_of_ceiling:.0f}%",
            _num(v.predicted_tok_s, ".1f", "-" if v.kind != "torus" else "∞"),
            text_cell(v, report.reference),
        )
    return t


def write_chart(report: BenchReport, path: Path) -> Path:
    """Bar chart of decode tok/s per variant; each bar's link ceiling is a red line over it, and the
    baseline's speed a dashed line across. Ceilings far above the bars are drawn at the top, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ran = [v for v in report.variants if v.status == "ok" and v.decode_tok_s is not None]
    colors = {"baseline": "#7f7f7f", "torus": "#1f77b4", "accelerate": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(ran) + 2.5), 5.2), dpi=120)
    xs = list(range(len(ran)))
    bars = ax.bar(xs, [v.decode_tok_s for v in ran], color=[colors.get(v.kind, "#999") for v in ran], width=0.6)
    top = max((v.decode_tok_s for v in ran), default=1.0)
    ceilings = [v.link_ceiling_tok_s for v in ran if v.link_ceiling_tok_s]
    # Ceilings up to 4× the fastest bar are drawn to scale; higher ones sit at the top, labelled.
    cap = max([top] + [c for c in ceilings if c <= 4 * top])
    cap = cap if all(c <= cap for c in ceilings) else max(cap, 2 * top)
    ax.set_ylim(0, cap * 1.15)
    handles = [Patch(color=c, label=k) for k, c in colors.items() if any(v.kind == k for v in ran)]
    base = next((v for v in ran if v.kind == "baseline"), None)
    if base is not None:
        ax.axhline(base.decode_tok_s, color="#555", ls="--", lw=1)
        handles.append(Line2D([], [], color="#555", ls="--", lw=1, label="baseline decode tok/s"))
    for b, v in zip(bars, ran):
        mid = b.get_x() + b.get_width() / 2
        ax.annotate(
            f"{v.decode_tok_s:.1f}",
            (mid, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
        c = v.link_ceiling_tok_s
        if c:
            y = min(c, cap)
            ax.hlines(y, b.get_x() - 0.08, b.get_x() + b.get_width() + 0.08, colors="#d62728", linewidths=2.5)
            label = f"{c:.0f}" + (" (off scale)" if c > y else "")
            ax.annotate(
                label,
                (mid, y),
                ha="center",
                va="bottom",
                fontsize=7,
                color="#d62728",
                xytext=(0, 2),
                textcoords="offset points",
            )
    if ceilings:
        handles.append(Line2D([], [], color="#d62728", lw=2.5, label="link ceiling = bandwidth ÷ bytes/token"))
    tilt = len(ran) > 4
    ax.set_xticks(xs, [v.name for v in ran], rotation=25 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_ylabel("decode tokens / s (higher is better)")
    h = report.header
    st = h["settings"]
    ax.set_title(
        f"{h['model']['name']} on {h['device']}\nbudget {format_bytes(st['budget_bytes'])}, "
        f"link {st['bandwidth_bps'] / 1e9:.1f} GB/s ({st['transport']}), {st['tokens']} new tokens, greedy",
        fontsize=9,
    )
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22 if tilt else -0.1),
        ncol=min(len(handles), 3),
        frameon=False,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
