"""`torus-sparse chat`: a terminal chat with a streamed model.

Each turn sends the whole conversation; the reply streams token by token. Commands: /reset,
/history, /stats, /help, /quit. Ctrl+D or Ctrl+C at the prompt leaves (exit 0). Ctrl+C during a
reply stops it there: the partial reply stays in the history, as the user saw it (a reply stopped
before its first token drops the question too, so turns keep alternating).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from torus_plugins.config import format_bytes

PROMPT = "[bold cyan]you[/] › "
HELP = "commands: /reset (clear the conversation), /history, /stats, /help, /quit (or Ctrl+D)"


@dataclass
class ChatState:
    """The loaded model and the conversation so far (user and assistant turns, no system prompt)."""

    tm: Any
    max_new_tokens: int = 256
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    #: `generate()` keywords for each reply (sampling; see `sampling_args`). Empty: greedy.
    gen_kwargs: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """What the next turn sends: the system prompt, if any, then the whole conversation."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history


# ---------------------------------------------------------------------- commands
def cmd_reset(console: Console, state: ChatState) -> None:
    state.history.clear()
    console.print("[dim]conversation cleared[/]")


def cmd_history(console: Console, state: ChatState) -> None:
    if not state.messages():
        console.print("[dim](history is empty)[/]")
    for m in state.messages():
        console.print(f"[bold]{m['role']}:[/] ", end="")
        console.print(m["content"], markup=False, highlight=False)


def stats_table(stats: Any) -> Table:
    """The engine's counters as a two-column table."""
    table = Table(title="engine stats", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    if stats.transport == "zero-copy":
        placement = ("zero-copy layers", str(len(stats.layers)))
    else:
        placement = ("resident / streamed layers", f"{stats.resident_layers} / {stats.streamed_layers}")
    rows = [
        ("transport", stats.transport),
        ("device", stats.device),
        placement,
        ("hits", str(stats.hits)),
        ("misses", str(stats.misses)),
        ("hit rate", f"{stats.hit_rate:.1%}"),
        ("bytes moved", format_bytes(stats.bytes_moved)),
        ("stall", f"{stats.stall_s * 1000:.1f} ms"),
        ("forward passes", str(stats.forward_passes)),
        ("resident bytes", format_bytes(stats.resident_bytes)),
        ("peak device", format_bytes(stats.peak_device_bytes)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def cmd_stats(console: Console, state: ChatState) -> None:
    console.print(stats_table(state.tm.stats()))


def cmd_help(console: Console, state: ChatState) -> None:
    console.print(HELP, highlight=False)


COMMANDS: dict[str, Callable[[Console, ChatState], None]] = {
    "/reset": cmd_reset,
    "/history": cmd_history,
    "/stats": cmd_stats,
    "/help": cmd_help,
}
QUIT = ("/quit", "/exit")


# ---------------------------------------------------------------------- one turn
def stream_reply(console: Console, state: ChatState, text: str) -> None:
    """Send `text` with the conversation, print the reply as it streams, record both turns."""
    state.history.append({"role": "user", "content": text})
    pieces: list[str] = []
    try:
        gen = state.tm.stream_generate(state.messages(), max_new_tokens=state.max_new_tokens, **state.gen_kwargs)
        with contextlib.closing(gen):
            with console.status("[dim]thinking…[/]"):
                first = next(gen, "")
            for piece in itertools.chain([first] if first else [], gen):
                pieces.append(piece)
                console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                console.file.flush()
    except KeyboardInterrupt:
        console.print(" [dim]⏹ stopped[/]" if pieces else "[dim]⏹ stopped[/]")
    except Exception as exc:  # one clear line; the chat goes on without this turn
        state.history.pop()
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        return
    else:
        console.print()
    if pieces:
        state.history.append({"role": "assistant", "content": "".join(pieces)})
    else:
        state.history.pop()


# ---------------------------------------------------------------------- the loop
def read_line(console: Console) -> str | None:
    """The user's next line, or None when they leave (Ctrl+D or Ctrl+C)."""
    try:
        return console.input(PROMPT)
    except (EOFError, KeyboardInterrupt):
        console.print()
        return None


def chat_loop(console: Console, state: ChatState) -> int:
    """Read a line, run a command or a turn, repeat until /quit, Ctrl+D or Ctrl+C at the prompt."""
    console.print(f"[dim]{HELP}[/]", highlight=False)
    while (line := read_line(console)) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            name = text.split()[0].lower()
            if name in QUIT:
                break
            if name not in COMMANDS:
                console.print(f"unknown command {name}", markup=False)
            COMMANDS.get(name, cmd_help)(console, state)
            continue
        stream_reply(console, state, text)
    console.print("[dim]bye[/]")
    return 0


def run_chat(args: Any) -> int:
    """`torus-sparse chat`: load with a spinner, then chat. Load errors propagate (exit 2 in `main`)."""
    import torch

    from .config_args import config_from_args as _config_from
    from .loading import load_model
    from .sampling_args import sampling_kwargs

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    console = Console(highlight=False)
    need = "chat sends conversations through it: use `torus-sparse generate --raw` to continue plain text"
    tm = load_model(args, _config_from(args), console, no_template=need)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    console.print(f"[dim]{tm.stats().summary()}[/]", highlight=False, soft_wrap=True)
    state = ChatState(
        tm, args.max_new_tokens, args.system, gen_kwargs=sampling_kwargs(args, tm.model.generation_config)
    )
    return chat_loop(console, state)
