"""`torus-sparse serve`: OpenAI- and Text-Generation-Inference-compatible HTTP server for one model.

    from torus_plugins import TorusModel
    from torus_adapters.server import ServerSettings, create_app
    app = create_app(TorusModel.from_pretrained(), ServerSettings(api_key="..."))

Modules, one job each: `app` (wiring), `openai_routes` / `tgi_routes` (+ `*_schemas`),
`request_model` (parsing bodies), `errors` (per-client error bodies), `service` (preparing requests
off the event loop, token limits, the shutdown drain), `scheduler` (batched decode thread),
`kvbatch` (padded batch KV cache), `chunk_attention` (attention of later prefill chunks),
`sampling`, `constraints` (grammars), `grammar_limits` (bounds checked before the grammar library)
and `grammar_sandbox` (a first compile in a child), `detok` (text and stop strings), `generation`
(request, steps, handle), `sse`, `metrics`, `auth` (API key), `hosts` (Host check), `body_limit`
(body size and time), `connection` (head deadline and caps, half-closed requests), `settings`,
`run` (uvicorn, drain on SIGTERM).
"""

from __future__ import annotations

from .app import create_app
from .run import serve
from .scheduler import Scheduler
from .settings import ServerSettings

__all__ = ["Scheduler", "ServerSettings", "create_app", "serve"]
