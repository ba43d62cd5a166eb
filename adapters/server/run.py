"""Run the server with uvicorn (what `torus-sparse serve` calls)."""

from __future__ import annotations

import os
from typing import Any

from .settings import ServerSettings


def default_model_name(model_arg: str | None) -> str:
    """The id clients see: the embedded default's name, else the model path's or Hub id's last part."""
    if model_arg is None:
        from torus_adapters.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    name = os.path.basename(os.path.normpath(os.path.expanduser(model_arg)))
    return name.removesuffix(".gguf") or model_arg


def serve(
    tm: Any, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve `tm` until interrupted (Ctrl+C stops uvicorn, then the scheduler)."""
    import uvicorn

    from .app import create_app

    # Streams still open at Ctrl+C get 5 s to finish; then they are closed (and their generations cancelled).
    uvicorn.run(create_app(tm, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
