"""Compile request grammars first in a child process, so a crash or a hang of the native grammar
library costs a 400, not the server.

`grammar_limits` refuses the inputs known to crash llguidance (a flat chain of 3,000 `$ref`s
overflowed its stack), but the library is native code: an input nobody has tried could still
crash it. So every grammar is validated once in a small child process (`python -c`, importing
llguidance only) before the server compiles it itself. A child that dies on a grammar, or does
not answer within `TIMEOUT_S`, is replaced and the grammar refused; the server's own compile
then only ever sees grammars that compiled cleanly in the child.

One child per server process, one grammar at a time (compiling is milliseconds); it starts with
the first grammar (the warm-up) and exits when the server does (its stdin closes).
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

#: Seconds a grammar may take to compile in the child before it is refused.
TIMEOUT_S = 10.0

_CHILD = """
import json, sys
from llguidance import LLMatcher, LLParserLimits
limits = LLParserLimits(verbose_errors=False)
for line in sys.stdin:
    try:
        error = LLMatcher.validate_grammar(json.loads(line), None, limits=limits)
    except Exception as exc:
        error = str(exc) or type(exc).__name__
    sys.stdout.write(json.dumps(error) + "\\n")
    sys.stdout.flush()
"""


class GrammarSandbox:
    """`check(source)`: None when the grammar compiles in the child, else why not (one line)."""

    def __init__(self, timeout: float = TIMEOUT_S) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def check(self, source: str) -> str | None:
        with self._lock:
            proc = self._child()
            assert proc.stdin is not None and proc.stdout is not None
            answered = False
            try:
                proc.stdin.write(json.dumps(source) + "\n")
                proc.stdin.flush()
                answered = bool(select.select([proc.stdout], [], [], self.timeout)[0])
                line = proc.stdout.readline() if answered else ""
            except OSError:  # the child is gone (a broken pipe)
                answered, line = True, ""
            if line:
                return json.loads(line) or None
            self._stop()
            if answered:  # the pipe closed: the child died on this grammar
                log.warning("the grammar library crashed on a request's grammar (exit %s)", proc.returncode)
                return "the grammar library failed on it"
            return f"it took over {self.timeout:g} s to compile"

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
