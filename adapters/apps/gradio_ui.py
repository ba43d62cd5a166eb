"""The Gradio demo (`python gradio_app.py`): chat with a streamed model and watch the engine work.

Left: the chat, replies streamed as they are generated. Right: the engine's stats (resident vs
streamed bytes, hit rate, tok/s, stall time) and two plots, all updated as tokens arrive, and
the settings (VRAM budget, lookahead, transport) that re-attach the engine with a progress bar.

API endpoints (for `gradio_client`): `/chat` (message, history, max_new_tokens; streamed),
`/stats`, `/reload` (budget_mib, lookahead, transport).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

import gradio as gr
import pandas as pd
import torch

from torus_plugins import EngineStats, TorusConfig, TorusError
from torus_plugins.config import format_bytes
from torus_plugins.plugins import resolve

from .demo_session import (
    BudgetRange,
    Counters,
    DemoSession,
    MiB,
    ReplyStats,
    budget_range,
    default_transport,
    to_messages,
)

_PLOT_COLUMNS = ["token", "tok/s", "MiB streamed"]
_THEME = gr.themes.Soft(  # system fonts: the page loads nothing from outside the server
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def _empty_plot() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in _PLOT_COLUMNS})


# ---------------------------------------------------------------------- rendering
def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def _rate(c: Counters) -> str:
    total = c.hits + c.misses
    return f"{c.hit_rate:.1%} ({c.hits}/{total})" if total else "—"


def render_panel(
    placement: EngineStats,
    totals: Counters,
    reply: ReplyStats | None,
    running: bool,
    generated: tuple[int, float | None] = (0, None),
) -> str:
    """The stats panel as Markdown. `generated`: tokens and decode tok/s of the replies finished
    since attach (`DemoSession.generated`)."""
    p = placement
    head = f"**Engine** · transport `{p.transport}` on `{p.device}` · lookahead {p.lookahead}"
    if p.streamed_layers == 0 and p.transport == "zero-copy":
        where = (
            f"| FFN weights | layers | bytes |\n|---|---:|---:|\n"
            f"| read in place from host RAM (zero-copy) | {len(p.layers)} | {format_bytes(p.host_store_bytes)} |\n"
        )
    else:
        where = (
            f"| FFN weights | layers | bytes |\n|---|---:|---:|\n"
            f"| resident on the device | {p.resident_layers} | {format_bytes(p.resident_bytes)} |\n"
            f"| streamed from host RAM | {p.streamed_layers} | {format_bytes(p.streamed_bytes_per_pass)} per token |\n"
        )
    extra = (
        f"non-FFN weights {format_bytes(p.non_ffn_bytes)} · slot ring {format_bytes(p.ring_bytes)} · "
        f"peak device {format_bytes(p.peak_device_bytes)}"
    )
    title = "Reply in progress" if running else "Last reply"
    r = reply
    rc = r.counters if r is not None else None

    def cell(value: str | None) -> str:
        return value if value is not None else "—"

    rows = [
        ("tokens", cell(str(r.tokens) if r else None), str(generated[0])),
        (
            "decode speed",
            cell(f"{r.decode_tok_s:.1f} tok/s" if r and r.decode_tok_s else None),
            cell(f"{generated[1]:.1f} tok/s" if generated[1] else None),
        ),
        ("first token", cell(f"{r.first_token_s:.2f} s" if r and r.first_token_s is not None else None), ""),
        ("streamed host→device", cell(format_bytes(rc.bytes_moved) if rc else None), format_bytes(totals.bytes_moved)),
        ("hit rate", cell(_rate(rc) if rc else None), _rate(totals)),
        ("stall", cell(_ms(rc.stall_s) if rc else None), _ms(totals.stall_s)),
    ]
    table = "| | this reply | since attach |\n|---|---:|---:|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    return f"{head}\n\n{where}\n{extra}\n\n**{title}**\n\n{table}"


def stats_dict(
    config: TorusConfig,
    placement: EngineStats,
    totals: Counters,
    reply: ReplyStats | None,
    running: bool,
    generated: tuple[int, float | None] = (0, None),
) -> dict[str, Any]:
    """The panel's numbers as JSON (what `/stats` and `/chat` return to API clients)."""
    engine = placement.as_dict()
    engine.pop("layers")
    engine.update(
        vram_budget=config.budget_bytes,
        hits=totals.hits,
        misses=totals.misses,
        hit_rate=totals.hit_rate,
        bytes_moved=totals.bytes_moved,
        stall_s=totals.stall_s,
        tokens_since_attach=generated[0],
        decode_tok_s_since_attach=generated[1],
    )
    return {"engine": engine, "reply": reply.as_dict() if reply else None, "running": running}


def _with_range(data: dict[str, Any], budget: BudgetRange) -> dict[str, Any]:
    data["engine"]["vram_budget_range"] = {"minimum": budget.minimum, "full": budget.full}
    return data


# ---------------------------------------------------------------------- the page
def _transports() -> list[str]:
    names = sorted(resolve().transports)
    if not torch.cuda.is_available():
        names = [n for n in names if n != "cuda"]
    return ["auto", *names]


def build_demo(session: DemoSession, budget: BudgetRange, title: str = "SmolLM2-135M-Instruct") -> gr.Blocks:
    """The Blocks app around `session` (not launched). `budget` sets the budget slider's range."""
    state = {"reply": None}  # the last reply's stats, shown on page load and by /stats

    def snapshot(running: bool = False) -> tuple[str, dict[str, Any]]:
        placement, totals, reply = session.placement(), session.totals(), state["reply"]
        generated = session.generated()
        return (
            render_panel(placement, totals, reply, running, generated),
            _with_range(stats_dict(session.config, placement, totals, reply, running, generated), budget),
        )

    def chat(message: str, history: list[dict[str, Any]], max_new_tokens: float):
        """Send `message` after `history`; yields the growing reply with the live stats and plots."""
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            panel, data = snapshot()
            yield "", history, panel, data, gr.skip(), gr.skip()
            return
        messages = to_messages(history, message)
        history.append({"role": "user", "content": message})
        rows: list[tuple[int, float, float]] = []
        panel, data = snapshot(running=True)
        yield "", history, panel, data, _empty_plot(), _empty_plot()
        try:
            for text, reply in session.reply(messages, max_new_tokens=int(max_new_tokens)):
                state["reply"] = reply
                if reply.decode_tok_s is not None and (not rows or rows[-1][0] != reply.tokens):
                    rows.append((reply.tokens, reply.decode_tok_s, reply.counters.bytes_moved / MiB))
                plot = pd.DataFrame(rows, columns=_PLOT_COLUMNS) if rows else _empty_plot()
                panel, data = snapshot(running=True)
                yield "", [*history, {"role": "assistant", "content": text}], panel, data, plot, plot
        except TorusError as exc:
            raise gr.Error(str(exc)) from exc
        panel, data = snapshot()
        yield "", [*history, {"role": "assistant", "content": text}], panel, data, gr.skip(), gr.skip()

    def reload(budget_mib: float, lookahead: float, transport: str, progress=gr.Progress()):  # noqa: B008
        """Re-attach the engine with a new VRAM budget (MiB), lookahead and transport."""
        try:
            config = session.config.replace(
                vram_budget=int(budget_mib * MiB), lookahead=int(lookahead), transport=transport
            )
            progress(0, desc="waiting for the reply in progress" if session.busy else "detaching the engine")
            session.reconfigure(
                config,
                progress=lambda done, total: progress((done, total), desc="packing FFN layers", unit="layers"),
                waiting=lambda: progress(0, desc="waiting for the reply in progress"),
            )
        except TorusError as exc:
            raise gr.Error(f"settings not applied, the previous engine is back: {exc}") from exc
        state["reply"] = None
        panel, data = snapshot()
        return _settings_line(session.config), panel, data

    def on_load():
        """A fresh page shows the engine as it is now (another visitor or client may have changed it)."""
        panel, data = snapshot()
        cfg = session.config
        budget_now = round(cfg.budget_bytes / MiB) if cfg.budget_bytes is not None else gr.skip()
        return panel, data, budget_now, cfg.lookahead, cfg.transport, _settings_line(cfg)

    def clear():
        return [], _empty_plot(), _empty_plot()

    cfg = session.config
    lo, hi = math.ceil(budget.minimum / MiB), math.ceil(budget.full / MiB)
    current = cfg.budget_bytes / MiB if cfg.budget_bytes is not None else hi
    panel0, data0 = snapshot()
    device = session.placement().device
    with gr.Blocks(title="torus-sparse demo", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# torus-sparse · {title}\n"
            f"The model's FFN weights live in host RAM; those the VRAM budget cannot hold stream to `{device}` "
            f"just before each layer runs, overlapped with compute."
            + (
                ""
                if device.startswith("cuda")
                else " No GPU here, so the demo picks the `copy` transport: a background copy worker (the CPU "
                "twin of the CUDA copy stream) really moves the bytes counted below, where the CPU's automatic "
                "`zero-copy` would read the weights in place and move nothing."
            )
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                msg = gr.Textbox(
                    placeholder="Ask something, e.g. What is the capital of France?",
                    show_label=False,
                    elem_id="message",
                    autofocus=True,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_btn = gr.Button("Clear")
                max_tokens = gr.Slider(8, 512, value=128, step=8, label="max new tokens")
                with gr.Row():  # this reply, one point per update
                    speed_plot = gr.LinePlot(
                        _empty_plot(), x="token", y="tok/s", title="decode speed", height=220, elem_id="speed"
                    )
                    traffic_plot = gr.LinePlot(
                        _empty_plot(),
                        x="token",
                        y="MiB streamed",
                        title="streamed host→device",
                        height=220,
                        elem_id="traffic",
                    )
            with gr.Column(scale=2):
                panel = gr.Markdown(panel0, elem_id="stats")
                refresh = gr.Button("Refresh stats", size="sm")
                with gr.Accordion("Engine settings (re-attaches the engine)", open=True):
                    budget_in = gr.Slider(
                        lo,
                        max(hi, math.ceil(current)),
                        value=round(current),
                        step=1,
                        label=f"VRAM budget (MiB): {lo} streams every FFN layer (at lookahead {cfg.lookahead}), {hi} keeps all resident",
                    )
                    lookahead_in = gr.Slider(1, 8, value=cfg.lookahead, step=1, label="lookahead (FFN layers)")
                    transport_in = gr.Dropdown(_transports(), value=cfg.transport, label="transport")
                    apply = gr.Button("Apply settings", variant="secondary", elem_id="apply")
                    status = gr.Markdown(_settings_line(cfg))
                data = gr.JSON(data0, label="stats (JSON)", visible=False)

        chat_outputs = [msg, chatbot, panel, data, speed_plot, traffic_plot]
        chat_inputs = [msg, chatbot, max_tokens]
        msg.submit(chat, chat_inputs, chat_outputs, api_name="chat", concurrency_id="chat")
        send.click(chat, chat_inputs, chat_outputs, api_visibility="private", concurrency_id="chat")
        clear_btn.click(clear, None, [chatbot, speed_plot, traffic_plot], api_visibility="private")
        refresh.click(snapshot, None, [panel, data], api_name="stats")
        apply.click(reload, [budget_in, lookahead_in, transport_in], [status, panel, data], api_name="reload")
        demo.load(on_load, None, [panel, data, budget_in, lookahead_in, transport_in, status], api_visibility="private")
    return demo


def _settings_line(cfg: TorusConfig) -> str:
    budget = format_bytes(cfg.budget_bytes) if cfg.budget_bytes is not None else "automatic"
    return f"Attached: budget {budget}, lookahead {cfg.lookahead}, transport `{cfg.transport}`."


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradio_app.py", description="torus-sparse Gradio demo (binds 127.0.0.1).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--vram-budget",
        help="device budget, e.g. 550MiB (default: halfway between streaming every FFN layer and none)",
    )
    p.add_argument(
        "--lookahead",
        type=int,
        default=TorusConfig().lookahead,
        help="FFN layers copied ahead of compute (default %(default)s)",
    )
    p.add_argument("--transport", help="auto, copy, zero-copy, … (default: auto on a GPU, copy on the CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        config = TorusConfig(
            vram_budget=args.vram_budget, lookahead=args.lookahead, transport=args.transport or default_transport()
        )
        budget = budget_range(args.model, config)
        if config.budget_bytes is None:
            config = config.replace(vram_budget=(budget.minimum + budget.full) // 2)
        print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}…", file=sys.stderr, flush=True)
        session = DemoSession.load(args.model, config)
    except TorusError as exc:
        print(f"gradio_app.py: error: {exc}", file=sys.stderr)
        return 2
    demo = build_demo(session, budget, title=args.model or "SmolLM2-135M-Instruct")
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=_THEME, show_error=True)
    return 0
