"""`transformers serve`, unchanged, with FFN streaming enabled: `torus-sparse transformers-serve`.

The plugin enters an existing framework the way a user would enable it in their own code:
`torus_plugins.enable(config)` before the framework loads its model, so every
`from_pretrained` inside `transformers serve` returns a model whose FFN weights stream. One
addition to the served app, `GET /torus/stats`, shows the engines' counters, so a client can
see that the FFNs were streamed.

`transformers serve` needs a model directory whose config names its `architectures` (a GGUF
path fails there); with no model argument the embedded default's safetensors cache is served.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Sequence

from torus_plugins import TorusConfig

from .enable import attached_models, enable

STATS_ROUTE = "/torus/stats"


def engine_stats() -> dict[str, Any]:
    """Counters of every model attached through `enable()`, JSON-ready (per-layer lists dropped)."""
    from torus_plugins import get_engine

    engines = []
    for model in attached_models():
        stats = get_engine(model).stats().as_dict()
        stats.pop("layers")
        engines.append({"model": str(getattr(model.config, "name_or_path", type(model).__name__)), "stats": stats})
    return {"engines": engines}


def _with_stats_route(build_server):
    @functools.wraps(build_server)
    def build(*args: Any, **kwargs: Any):
        app = build_server(*args, **kwargs)
        app.add_api_route(STATS_ROUTE, engine_stats, methods=["GET"], summary="torus-sparse engine counters")
        return app

    return build


def run(serve_args: Sequence[str], config: TorusConfig) -> int:
    """Enable streaming under `config`, then run `transformers serve serve_args...` in this process."""
    from transformers.cli import serve as serve_module
    from transformers.cli.serving import server as server_module
    from transformers.cli.transformers import main as transformers_main

    from .default_model import default_model_path

    args = list(serve_args)
    if args[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER
        args = args[1:]
    if not args or args[0].startswith("-"):
        args.insert(0, str(default_model_path()))
    enable(config)
    # `Serve.__init__` imports build_server from this module at call time: wrap it there.
    server_module.build_server = _with_stats_route(server_module.build_server)
    assert serve_module  # imported so a version without `transformers serve` fails here, clearly
    sys.argv = ["transformers", "serve", *args]
    transformers_main()
    return 0
