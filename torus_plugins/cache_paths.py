"""Where torus-sparse keeps files between runs: one root, one folder per kind.

`$TORUS_SPARSE_CACHE`, else `$XDG_CACHE_HOME/torus-sparse`, else `~/.cache/torus-sparse`; inside
it `native/` (compiled kernels), `stores/` (quantized host stores) and the adapters' converted
models. One root so that one variable moves (or one `rm -r` clears) all of it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$TORUS_SPARSE_CACHE`, else `$XDG_CACHE_HOME/torus-sparse`, else `~/.cache/torus-sparse`."""
    env = os.environ.get("TORUS_SPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torus-sparse"
