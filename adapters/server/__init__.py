"""`torus-sparse serve`: OpenAI- and Text-Generation-Inference-compatible HTTP server for one model.

    from torus_plugins import TorusModel
    from torus_adapters.server import ServerSettings, create_app
    app = create_app(TorusModel.from_pretrained(), ServerSettings(api_key="..."))

Modules, one job each: `app` (wiring), `openai_routes` / `tgi_routes` (+ `*_schemas`), `errors`
(per-client error bodies), `service` (prompts, context limits), `scheduler` (batched decode
thread), `kvbatch` (padded batch KV cache), `sampling`, `detok` (text and stop strings),
`generation` (request, steps, handle), `sse`, `metrics`, `auth`, `body_limit`, `settings`, `run`.
"""

from __future__ import annotations

from .app import create_app
from .run import serve
from .scheduler import Scheduler
from .settings import ServerSettings

__all__ = ["Scheduler", "ServerSettings", "create_app", "serve"]
