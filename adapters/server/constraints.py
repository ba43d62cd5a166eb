"""Constrained decoding: the grammar a request's reply must match, compiled and enforced by llguidance.

`Grammars` turns what a request asks for (a JSON schema, "any JSON object", a regular expression, a
Lark grammar) into a grammar llguidance has checked against this tokenizer. It runs in the prepare
worker thread, so a schema the library cannot compile is a 400 that names the field before any
decoding starts. Nothing reaches the library unchecked: schemas and regular expressions are first
bounded in Python (`grammar_limits`: size, depth, `$ref` chains and loops, repetition counts), then
compiled once in a child process (`grammar_sandbox`: a crash or a hang there is a 400), the
library works under its own fuel limits (`LLParserLimits`: what bounds compile and mask time) with
terse errors (no parser state), every exception it raises is a 400 with one sentence, and a new
request's matcher computes its first mask before the request is accepted, so a grammar that cannot
even start is refused, not failed mid-batch.

`Constraint` is one request's matcher, used by the scheduler thread: before each
choice it masks that row's logits to the tokens the grammar allows; after it, it consumes the
token; once the grammar is complete (`done`), the request ends. Free requests carry no constraint
and pay nothing.

llguidance was chosen over xgrammar and outlines on this model (`benchmarks/constrained_decode.py`,
`benchmarks/results/constrained_decode.json`): one 8 MB wheel with no dependencies, every schema of
the coverage set compiled, and a per-token mask far below a decode step on 2 CPU cores.

JSON is generated with fixed separators (`", "` and `": "`) and no free whitespace, so a small
model cannot wander into endless newlines and the text looks like `json.dumps` output.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ApiError, bad_request
from .grammar_limits import check_regex, check_schema
from .grammar_sandbox import GrammarSandbox

log = logging.getLogger(__name__)

#: How JSON is laid out under a grammar (llguidance's JSON compiler options).
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """A grammar llguidance has validated against the served tokenizer (its serialized form)."""

    source: str
    kind: str  # "json_schema", "json_object", "regex", "lark": for logs and metrics
    param: str = "response_format"  # the request field it came from (named in errors)


def _limits() -> Any:
    """llguidance's resource limits for request grammars: its defaults, terse errors."""
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


def _refused(param: str, what: str, exc: BaseException | str) -> ApiError:
    """The 400 for a grammar the library refused: one sentence, the library's first line at most."""
    reason = _first_lines(str(exc), 1)[:200].rstrip(".")
    return bad_request(f"{param} {what}{f' ({reason})' if reason else ''}", param)


#: llguidance tokenizers already built, per Hugging Face tokenizer (servers sharing a model share one).
_BUILT: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_BUILD_LOCK = threading.Lock()


class Grammars:
    """Compiles request grammars for one tokenizer. The llguidance tokenizer is built once per
    tokenizer, in a background thread from the start (`warm`), so the first constrained request
    does not wait for it."""

    def __init__(self, tokenizer: Any, vocab_size: int, warm: bool = True) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.sandbox = GrammarSandbox()
        if warm:
            threading.Thread(target=self._warm, name="torus-serve-grammar-warmup", daemon=True).start()

    def _warm(self) -> None:
        """Build llguidance's tokenizer and compute one mask, so the first constrained request finds
        everything ready."""
        try:
            grammar_masks([self.start(self.json_object())], self.vocab_size)
        except Exception:  # a warm-up only: the first real request reports any real problem
            log.debug("grammar warm-up failed", exc_info=True)

    @property
    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (about a second to build for a 50k vocabulary)."""
        with _BUILD_LOCK:
            try:
                built = _BUILT.setdefault(self._hf_tokenizer, {})
            except TypeError:  # a tokenizer that cannot be weakly referenced: keep it on this object
                built = self.__dict__.setdefault("_built", {})
            if self.vocab_size not in built:
                import llguidance.hf

                built[self.vocab_size] = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            return built[self.vocab_size]

    # ------------------------------------------------------------------ building grammars
    def json_schema(self, schema: Any, param: str) -> Grammar:
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise bad_request(f"{param} must be a JSON Schema object", param)
        check_schema(schema, param)
        try:
            source = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except Exception as exc:  # the library's words for a schema it cannot read
            raise _refused(param, "is not a JSON Schema this server can enforce", exc) from None
        return self._checked(source, "json_schema", param)

    def json_object(self, param: str = "response_format") -> Grammar:
        return self.json_schema({"type": "object"}, param)

    def regex(self, pattern: str, param: str) -> Grammar:
        from llguidance import LLMatcher

        check_regex(pattern, param)
        try:
            source = LLMatcher.grammar_from_regex(pattern)
        except Exception as exc:
            raise _refused(param, "is not a regular expression this server can enforce", exc) from None
        return self._checked(source, "regex", param)

    def lark(self, grammar: str, param: str) -> Grammar:
        from llguidance import LLMatcher

        try:
            source = LLMatcher.grammar_from_lark(grammar)
        except Exception as exc:
            raise _refused(param, "cannot be compiled into a grammar", exc) from None
        return self._checked(source, "lark", param)

    def close(self) -> None:
        """Stop the sandbox's child process."""
        self.sandbox.close()

    def _checked(self, source: str, kind: str, param: str) -> Grammar:
        from llguidance import LLMatcher

        error = self.sandbox.check(source)
        if error:
            raise _refused(param, "cannot be compiled into a grammar", error)
        try:
            error = LLMatcher.validate_grammar(source, self.tokenizer, limits=_limits())
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if error:
            raise _refused(param, "cannot be compiled into a grammar", error)
        return Grammar(source, kind, param)

    def start(self, grammar: Grammar) -> "Constraint":
        """A fresh matcher for one request (built in the prepare thread). Its first mask is computed
        here: a grammar that cannot start is a 400 naming its field, before the request is queued."""
        try:
            constraint = Constraint(self.tokenizer, grammar, self.vocab_size)
            error = constraint.first_mask()
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if error:
            raise _refused(grammar.param, "cannot be used as a grammar", error)
        return constraint


class ConstraintViolated(RuntimeError):
    """The matcher refused a token it had allowed, or entered an error state (a library fault)."""


class Constraint:
    """One request's grammar state: fills its row of a batch's token bitmask (`grammar_masks`),
    consumes the chosen tokens, knows when it is complete."""

    def __init__(self, ll_tokenizer: Any, grammar: Grammar, vocab_size: int) -> None:
        import llguidance

        self.grammar = grammar
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar.source, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise ConstraintViolated(self.matcher.get_error())
        self.vocab_size = vocab_size
        self._first: torch.Tensor | None = None  # the first mask, computed by `first_mask`

    def first_mask(self) -> str | None:
        """Compute the first mask now (kept for the first `fill`); the matcher's error, if any."""
        words = torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        if self.matcher.is_error():
            return self.matcher.get_error() or "the grammar cannot start"
        self._first = words
        return None

    def fill(self, bitmask: torch.Tensor, row: int) -> str | None:
        """Write the tokens the grammar allows next into `bitmask[row]` (int32, CPU, contiguous);
        return the matcher's error when it cannot go on (the row is then left all-allowed)."""
        words = bitmask[row]
        if self._first is not None:
            words.copy_(self._first)
            self._first = None
            return None
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        if self.matcher.is_error():
            words.fill_(-1)
            return self.matcher.get_error()
        return None

    def consume(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ConstraintViolated(self.matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the reply ends here."""
        return self.matcher.is_stopped()


def grammar_masks(constraints: Sequence[Constraint], width: int) -> tuple[torch.Tensor, list[str | None]]:
    """The tokens each constraint allows next, as bool [len(constraints), width] (columns past the
    vocabulary, padding of the LM head, are never allowed), and each row's error (None, or why its
    grammar cannot go on: that row is then all-allowed). One bitmask for the whole batch, decoded
    in one set of tensor ops, so a constrained row costs llguidance's own mask and little more.
    The constraints share one vocabulary (one server's)."""
    vocab = constraints[0].vocab_size
    bitmask = torch.empty((len(constraints), (vocab + 31) // 32), dtype=torch.int32)
    errors = [c.fill(bitmask, i) for i, c in enumerate(constraints)]
    allowed = allowed_tokens(bitmask, min(vocab, width))
    if width > vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(len(constraints), width - vocab)], dim=1)
    return allowed, errors


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's token bitmask ([rows, ceil(vocab / 32)] int32, bit b of word w = token 32 w + b)
    as bool [rows, vocab_size] ([vocab_size] for a 1-D bitmask). Plain torch ops: llguidance's own
    `apply_token_bitmask_inplace` is a `torch.compile`d kernel, whose first call compiles for
    seconds (stalling the batch), needs a C++ compiler, and while it compiles
    `torch.compiler.is_compiling()` reads True in every thread, which the engine's guard against
    compiled streamed layers then refuses."""
    bits = (bitmask[..., None] >> _BITS) & 1
    return bits.bool().flatten(-2)[..., :vocab_size]


def _first_lines(text: str, lines: int = 3) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:lines])


def schema_text(schema: Any) -> str:
    """A schema as compact JSON (for prompts and logs)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
