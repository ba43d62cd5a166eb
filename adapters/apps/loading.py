"""Loading the model a command runs (generate, chat, serve): one spinner, one rule for flags that cannot apply."""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING, Any

from torus_plugins import ConfigError, TorusConfig

if TYPE_CHECKING:
    from torus_adapters.transformers_adapter import TorusModel


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
            with console.status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}…"):
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
