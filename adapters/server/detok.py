"""Token ids → text, one token at a time, and stop strings.

`IncrementalDecoder` is the offset scheme TGI uses: decode a short window of recent ids and emit
only what the newest id added, holding text back while it ends in an incomplete UTF-8 sequence.
`StopMatcher` finds the first stop string in the text so far; `HoldBack` keeps a streamed reply
from showing the start of a stop string that may still complete.
"""

from __future__ import annotations

from typing import Any, Sequence


class IncrementalDecoder:
    """Turns a growing list of generated ids into text pieces (special tokens skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be "" while a character is incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class StopMatcher:
    """Watches the generated text for the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def push(self, piece: str) -> int | None:
        """Append text; return where the first stop string starts once one has appeared."""
        if not piece:
            return None
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None


class HoldBack:
    """What a stream may show now: the text so far minus any tail that could begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.shown = 0

    def push(self, piece: str, end: int | None = None) -> str:
        """Append text; return what may be shown now. `end`: a stop string starts there, show up to it."""
        self.text += piece
        if end is not None:
            return self._advance(max(end, self.shown))
        return self._advance(max(len(self.text) - self._open_tail(), self.shown))

    def finish(self) -> str:
        """Everything not yet shown (the reply ended without a stop string)."""
        return self._advance(len(self.text))

    def _open_tail(self) -> int:
        tail = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), tail, -1):
                if self.text.endswith(s[:n]):
                    tail = n
                    break
        return tail

    def _advance(self, upto: int) -> str:
        out = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return out
