"""The seed project's API, installed as `torus_sparse`: a thin alias over `TorusModel` / `TorusConfig`.

    from torus_sparse import TorusSparseModel, TorusSparseConfig

    model = TorusSparseModel.from_pretrained("path/or/hub-id", config=TorusSparseConfig(lookahead_horizon=2))
    print(model.generate("Hello", max_new_tokens=128))          # a string
    for piece in model.stream_generate("Hello", max_new_tokens=256):
        print(piece, end="")

Each seed field is mapped onto `TorusConfig` or refused with the reason (see `TorusSparseConfig`).
New code should use `torus_plugins.TorusModel` / `TorusConfig`, which have every option.
"""

from __future__ import annotations

from .config import TorusSparseConfig
from .model import TorusSparseModel

__version__ = "0.1.0"

__all__ = ["TorusSparseConfig", "TorusSparseModel", "__version__"]
