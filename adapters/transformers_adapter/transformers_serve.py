"""`transformers serve`, unchanged, with FFN streaming enabled: `torus-sparse transformers-serve`.

The plugin enters an existing framework the way a user would enable it in their own code:
`torus_plugins.enable(config)` where the framework loads its model, so every `from_pretrained`
inside `transformers serve` returns a model whose FFN weights stream. From transformers 5.25 that
is a spawned process per model, reached through the server's model loader (`serve_loader`). One
addition to the served app, `GET /torus/stats`, shows the engines' counters, so a client can
see that the FFNs were streamed.

`transformers serve` needs a model directory whose config names its `architectures` (a GGUF
path fails there); with no model argument the embedded default's safetensors cache is served.
"""

from __future__ import annotations

import functools
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from torus_plugins import TorusConfig, TorusError

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


def _with_stats_route(build_server, stats: Callable[[], dict[str, Any]]):
    @functools.wraps(build_server)
    def build(*args: Any, **kwargs: Any):
        app = build_server(*args, **kwargs)
        app.add_api_route(STATS_ROUTE, stats, methods=["GET"], summary="torus-sparse engine counters")
        return app

    return build


def _serve_args(serve_args: Sequence[str]) -> list[str]:
    args = list(serve_args)
    if args[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER
        args = args[1:]
    if not args or args[0].startswith("-"):
        from .default_model import default_model_path

        args.insert(0, str(default_model_path()))
    for i, arg in enumerate(args):
        count = arg.split("=", 1)[1] if arg.startswith("--api-server-count=") else None
        if arg == "--api-server-count" and i + 1 < len(args):
            count = args[i + 1]
        if count is not None and count != "1":
            # Each extra API server is a spawned process that builds its own app, without the
            # stats route; the model's process would stream, but nothing could show it.
            raise TorusError(
                f"torus-sparse transformers-serve runs one API server (got --api-server-count {count}): "
                "drop the flag, or use `torus-sparse serve`, which batches requests itself"
            )
    return args


def _loads_in_child(model_manager: Any) -> bool:
    """Whether this transformers loads models in a spawned process through `ModelLoader` (>= 5.25)."""
    loader = getattr(model_manager, "ModelLoader", None)
    return loader is not None and callable(getattr(loader, "load_model_and_processor", None))


def run(serve_args: Sequence[str], config: TorusConfig) -> int:
    """Run `transformers serve serve_args...` in this process, with streaming enabled where models load.

    transformers <= 5.24 loads models in this process: `enable(config)` here is enough. From 5.25
    each model loads in a spawned process: the configuration travels there inside the server's
    model loader (`serve_loader`), and `/torus/stats` asks those processes for their counters.
    """
    import transformers

    try:
        from transformers.cli import serve as serve_module  # noqa: F401  (a version without serve fails here)
        from transformers.cli.serving import model_manager
        from transformers.cli.serving import server as server_module
        from transformers.cli.transformers import main as transformers_main
    except ImportError as exc:
        raise TorusError(
            f"transformers {transformers.__version__} has no usable `transformers serve` ({exc}): "
            "install the tested versions with `pip install -c constraints.txt -e .`"
        ) from None

    args = _serve_args(serve_args)
    if _loads_in_child(model_manager):
        from . import serve_loader

        stats_dir = Path(tempfile.mkdtemp(prefix="torus-serve-stats-"))
        authkey = secrets.token_bytes(32)
        serve_loader.configure(config, stats_dir, authkey)
        model_manager.ModelLoader = serve_loader.TorusModelLoader  # `Serve` imports it at call time

        def stats() -> dict[str, Any]:
            return {"engines": serve_loader.collect_stats(stats_dir, authkey)}

    elif hasattr(model_manager, "ModelManager"):
        enable(config)
        stats = engine_stats
    else:
        raise TorusError(
            f"torus-sparse transformers-serve does not know how transformers {transformers.__version__} "
            "loads models in `transformers serve`, so it cannot stream them: install the tested versions with "
            "`pip install -c constraints.txt -e .`"
        )
    # `Serve.run` imports build_server from this module at call time: wrap it there.
    server_module.build_server = _with_stats_route(server_module.build_server, stats)
    sys.argv = ["transformers", "serve", *args]
    try:
        transformers_main()
    finally:
        if _loads_in_child(model_manager):
            shutil.rmtree(stats_dir, ignore_errors=True)
    return 0
