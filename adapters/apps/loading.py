"""Loading the model a command runs (generate, chat, serve): one spinner, one rule for flags that cannot apply."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from torus_plugins import ConfigError, TorusConfig

if TYPE_CHECKING:
    from torus_adapters.transformers_adapter import TorusModel


class _ProgressLines(logging.Handler):
    """Attach's progress records (`torus_plugins.progress`) on the command's status line; without
    a terminal, as lines on stderr, only for steps that run long (a log of a slow load, not of
    every tiny one)."""

    LONG_S = 10.0

    def __init__(self, console: Any, status: Any, label: str) -> None:
        super().__init__(logging.INFO)
        self.console, self.status, self.label = console, status, label

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().removeprefix("torus-sparse: ")
        if self.console.is_terminal:
            self.status.update(f"{self.label} {text}")
        elif getattr(record, "elapsed_s", 0.0) >= self.LONG_S:
            self.console.print(f"torus-sparse: {text}", highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def _attach_progress(console: Any, status: Any, label: str) -> Iterator[None]:
    logger = logging.getLogger("torus_plugins.progress")
    handler, level = _ProgressLines(console, status, label), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load_model(
    args: argparse.Namespace, config: TorusConfig, console: Any, *, no_template: str | None = None
) -> "TorusModel":
    """Load `--model` behind a spinner. A placement flag the transport cannot apply (a budget with
    the CPU's zero-copy default) is refused: the user typed it, so silently ignoring it would lie.

    no_template: when given, the model must have a chat template, and this says what to do
    instead; it is checked once the tokenizer is loaded, before any weight is read.
    """
    from transformers.utils import logging as hf_logging

    from torus_plugins import TorusModel

    from ..transformers_adapter.model_source import model_name, open_model
    from ..transformers_adapter.torus_model import BudgetIgnoredWarning

    hf_logging.disable_progress_bar()  # the spinner says what is happening
    name = model_name(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetIgnoredWarning)
        try:
            label = f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}…"
            with console.status(label) as status, _attach_progress(console, status, label):
                tokenizer = None
                if no_template is not None:
                    tokenizer = open_model(args.model)
                    if not getattr(tokenizer, "chat_template", None):
                        raise ConfigError(f"model {name!r} has no chat template; {no_template}")
                return TorusModel.from_pretrained(args.model, config, show_progress=False, tokenizer=tokenizer)
        except BudgetIgnoredWarning as exc:
            flags = str(exc).replace("transport='copy' (--transport copy)", "--transport copy")
            flags = flags.replace("vram_budget", "--vram-budget").replace("resident_layers", "--resident-layers")
            raise ConfigError(flags) from None
