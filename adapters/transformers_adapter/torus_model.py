"""`TorusModel`: load a transformers causal LM, attach an engine, generate from prompts or messages.

`TorusModel` is a thin convenience around a plain transformers model with an engine attached:
`tm.model` stays an ordinary `PreTrainedModel` whose own `generate()` works unchanged.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from torus_plugins import ConfigError, ModelNotFoundError, TorusConfig, TorusError
from torus_plugins.engine import Engine
from torus_plugins.lifecycle import attach, detach, get_engine
from torus_plugins.stats import EngineStats

from .enable import _BYPASS
from .lean_load import NotLean, load_lean
from .model_source import check_model, first_line, load_tokenizer, model_name, resolve_model_source

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, Any]]
Prompt = str | Messages

_ROLES = ("system", "user", "assistant", "tool")
#: `from_pretrained` keywords that also decide which config is read (the rest are the model's).
_CONFIG_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "trust_remote_code")


class PromptError(TorusError, ValueError):
    """A prompt or chat message list is malformed."""


def _load_model(source: str, extra: dict[str, Any], dtype: Any, hf_kwargs: dict[str, Any], lean: bool = True):
    from transformers import AutoModelForCausalLM

    # Always load into host memory: the engine then moves only non-FFN weights (and whatever
    # FFN layers the budget allows) to the device, so the device never holds the whole model.
    if hf_kwargs.pop("device_map", None) is not None:
        log.warning("torus-sparse places weights itself; ignoring device_map")
    if lean and not extra:
        try:
            return load_lean(source, dtype, **hf_kwargs)
        except NotLean as why:
            log.info("torus-sparse: loading %s through transformers (FFN weights in memory at once): %s", source, why)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **hf_kwargs)
    except OSError as exc:  # e.g. a truncated or mismatched weight file
        raise ModelNotFoundError(
            f"could not load model {source!r}: {first_line(exc)}. Local paths and models already in the Hugging Face "
            f"cache work offline; other Hub ids need network access."
        ) from exc


def _rich_progress(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress callback for attach (packing FFN layers), drawn with rich on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(label, total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


class BudgetIgnoredWarning(UserWarning):
    """A placement setting (a VRAM budget, resident layers) that the chosen transport cannot apply."""


def ignored_placement(config: TorusConfig, engine: Engine) -> str | None:
    """Why `config`'s placement settings do nothing on `engine`, or None when they apply.

    The zero-copy transport (the CPU default: the fastest there) computes from the host store in
    place, so a budget or a resident-layer count would be accepted and silently ignored.
    """
    if not getattr(engine.transport, "zero_copy", False):
        return None
    named = [name for name in ("vram_budget", "resident_layers") if getattr(config, name) is not None]
    if not named:
        return None
    return (
        f"{' and '.join(named)} cannot apply with the zero-copy transport (the default on the CPU): compute reads "
        f"the weights where they lie in host memory, so nothing is placed on a device or streamed; use "
        f"transport='copy' (--transport copy) to stream through a budget on the CPU"
    )


class _Cancelled:
    """A stopping criterion that ends `generate()` when a streaming consumer goes away."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class TorusModel:
    """A transformers causal LM with its FFN weights streamed by a torus-sparse engine.

    tm.model: the plain transformers model (its `generate()` works unchanged).
    tm.tokenizer: its tokenizer.
    tm.engine: the engine (stats, plan, transport).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # one generation at a time shares the slot ring

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str] | None = None,
        config: TorusConfig | None = None,
        *,
        dtype: Any = "auto",
        show_progress: bool | None = None,
        tokenizer: Any = None,
        lean: bool = True,
        **hf_kwargs: Any,
    ) -> "TorusModel":
        """Load a model (default: the embedded SmolLM2-135M-Instruct) and attach an engine.

        config: the engine's `TorusConfig` (default: automatic placement and transport).
        dtype: passed to `from_pretrained` ("auto" keeps the checkpoint's dtype).
        show_progress: draw a progress bar while FFN layers are packed; default: on a terminal.
        tokenizer: use this tokenizer instead of loading the model's own.
        lean: build the model without its FFN weights and let attach read each one from the
            checkpoint as it packs it (`lean_load`), so host memory never holds them all at once;
            a checkpoint the lean loader cannot prove equal to `from_pretrained` (GGUF, `.bin`,
            other weight conversions) loads through `from_pretrained`, with a log line saying why.
        hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (`device_map` is ignored).

        Before any weight is read, a directory without weights or tokenizer and a model that is
        not a causal LM are refused (`ModelNotFoundError`, `NotACausalLMError`), in one sentence.
        """
        source, extra = resolve_model_source(path_or_id)
        name = model_name(path_or_id)
        check_model(source, extra, name, **{k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs})
        token = _BYPASS.set(True)  # inside enabled(): attach once, with this config
        try:
            if tokenizer is None:
                tokenizer = load_tokenizer(source, extra, name)
            model = _load_model(source, extra, dtype, dict(hf_kwargs), lean)
        finally:
            _BYPASS.reset(token)
        model.eval()
        if show_progress is None:
            show_progress = os.isatty(2)
        progress, stop = _rich_progress("packing FFN layers") if show_progress else (None, lambda: None)
        config = config or TorusConfig()
        try:
            engine = attach(model, config, progress=progress)
        finally:
            stop()
        reason = ignored_placement(config, engine)
        if reason is not None:
            # A warning, not an error: the same script may run on a GPU, where the budget applies.
            warnings.warn(reason, BudgetIgnoredWarning, stacklevel=2)
        return cls(model, tokenizer)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "name_or_path", None) or type(self.model).__name__
        return f"TorusModel({name!r}, {self.stats().summary()})"

    @property
    def engine(self) -> Engine:
        return get_engine(self.model)

    @property
    def config(self) -> TorusConfig:
        return self.engine.config

    def stats(self) -> EngineStats:
        """Hits, misses, bytes moved, stall time, resident bytes, peak device memory (total and per layer)."""
        return self.engine.stats()

    def reset_stats(self) -> None:
        self.engine.reset_stats()

    def detach(self) -> Any:
        """Remove the engine; returns the plain model with its weights restored."""
        return detach(self.model)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, chat: bool | None = None) -> dict[str, torch.Tensor]:
        """Tokenize a prompt: a string, or a list of ``{"role", "content"}`` chat messages.

        chat: apply the chat template; default: for message lists always, for a string when the
        tokenizer has a chat template (an instruct model answers a bare string as a user turn).
        """
        tok = self.tokenizer
        if isinstance(prompt, str):
            if chat is None:
                chat = bool(getattr(tok, "chat_template", None))
            messages = [{"role": "user", "content": prompt}] if chat else None
        else:
            messages = validate_messages(prompt)
            if not getattr(tok, "chat_template", None):
                raise PromptError("this tokenizer has no chat template; pass the prompt as a plain string")
        if messages is not None and not getattr(tok, "chat_template", None):  # a string with chat=True
            raise PromptError("this tokenizer has no chat template; pass chat=False to send the prompt as plain text")
        if messages is not None:
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = tok(prompt, return_tensors="pt")
        device = self.engine.device
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _generate_kwargs(self, max_new_tokens: int, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            kw["pad_token_id"] = pad
        kw.update(gen_kwargs)
        return kw

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt: Prompt, max_new_tokens: int = 128, *, chat: bool | None = None, **gen_kwargs: Any
    ) -> str:
        """Generate a reply and return its text (greedy unless `do_sample=True` is passed)."""
        inputs = self.encode(prompt, chat)
        kw = self._generate_kwargs(max_new_tokens, gen_kwargs)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, **kw)
        new = out[0, inputs["input_ids"].shape[1] :]
        self.engine.publish("generation_finished", new_tokens=int(new.numel()))
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def stream_generate(
        self, prompt: Prompt, max_new_tokens: int = 128, *, chat: bool | None = None, **gen_kwargs: Any
    ) -> Iterator[str]:
        """Yield the reply's text piece by piece as tokens are generated.

        Stopping early (break, `close()`, KeyboardInterrupt) cancels the generation at the next
        token and leaves the model ready for the next call. Generations of one model run one at a
        time: iterators read side by side (`zip(a, b)`, in one thread or several) take turns, each
        generating to its end before the next starts, and an iterator left open unread holds the
        model only until its own generation has ended.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs = self.encode(prompt, chat)
        kw = self._generate_kwargs(max_new_tokens, gen_kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.05)
        cancel = threading.Event()
        errors: list[BaseException] = []
        criteria = StoppingCriteriaList(list(kw.pop("stopping_criteria", [])) + [_Cancelled(cancel)])

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if cancel.is_set():  # the consumer left while this generation waited its turn
                        streamer.end()
                        return
                    self.model.generate(**inputs, **kw, streamer=streamer, stopping_criteria=criteria)
            except BaseException as exc:  # surfaced in the consumer's thread below
                errors.append(exc)
                streamer.end()

        # The model's lock is held by the generating thread, not by this generator's frame: the
        # generation runs to its end (or to a cancel) whether or not anyone reads it, then lets go.
        # So two iterators read in one thread (`zip(a, b)`) take turns instead of deadlocking, and
        # an iterator left open holds the model only until its generation ends (max_new_tokens at
        # most); one dropped unread is closed by the garbage collector, which cancels it.
        worker = threading.Thread(target=run, name="torus-generate", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    piece = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:
                    if not worker.is_alive() and streamer.text_queue.empty():
                        break
                    continue
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if errors:
            raise errors[0]
        self.engine.publish("generation_finished")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat message list; raise `PromptError` saying what is wrong and what to send."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f'messages[{i}] must be a dict with "role" and "content", got {m!r}')
        if m["role"] not in _ROLES:
            raise PromptError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise PromptError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out
