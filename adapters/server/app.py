"""The FastAPI app: both wire formats over one model, plus `/health`, `/metrics` and the middleware.

Middleware, outermost first: HTTP metrics, Host check (when `allowed_hosts` is set), API key (when
set), body-size and body-time limit. Errors raised in routes go through `errors.install_handlers`,
so each client gets the error body it parses. `/docs`, `/redoc` and `/openapi.json` exist only
with `docs=True` (their pages load their scripts from a CDN).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from torus_plugins import __version__

from . import openai_routes, tgi_routes
from .auth import ApiKeyMiddleware
from .body_limit import BodyLimitMiddleware
from .errors import error_docs, install_handlers, is_openai_path
from .hosts import HostCheckMiddleware
from .metrics import CONTENT_TYPE, HttpMetricsMiddleware, ServerMetrics
from .request_model import REQUEST_MODELS
from .scheduler import Scheduler
from .service import ClientGone, ModelService
from .settings import ServerSettings
from .sse import EVENT_MODELS

#: Request fields whose documented maximum is the server's `max_tokens_limit`.
_TOKEN_LIMIT_FIELDS = {"max_tokens", "max_completion_tokens", "max_new_tokens"}


class Health(BaseModel):
    status: str


def create_app(tm: Any, settings: ServerSettings | None = None, *, scheduler: Scheduler | None = None) -> FastAPI:
    """Serve `tm` (a `TorusModel`). Pass `scheduler` to share one model between several apps
    (it is then not closed when this app shuts down)."""
    settings = settings or ServerSettings()
    owned = scheduler is None
    if scheduler is None:
        scheduler = Scheduler.for_model(
            tm,
            max_batch_size=settings.max_batch_size,
            max_pending=settings.max_pending,
            prefill_chunk=settings.prefill_chunk,
            prefill_slice=settings.prefill_slice,
        )
    service = ModelService(tm, scheduler, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        if owned:
            scheduler.close()

    app = FastAPI(
        title="torus-sparse",
        version=__version__,
        description="OpenAI- and Text-Generation-Inference-compatible server for a model whose FFN weights stream "
        "from host memory.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.service = service
    install_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    metrics = ServerMetrics(service)
    app.state.metrics = metrics
    app.include_router(openai_routes.build_router(service))
    app.include_router(tgi_routes.build_router(service))
    _common_routes(app, metrics)

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_hosts is not None and "*" not in settings.allowed_hosts:
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    _finish_openapi(app, service.max_tokens_limit, service.vocab_size, bool(settings.api_key), scheduler.max_batch_size)
    return app


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it: the client has gone


def _common_routes(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/health", response_model=Health, tags=["Both"], summary="Liveness (never needs the API key)")
    async def health():
        return {"status": "ok"}

    @app.head("/health", include_in_schema=False)  # load balancers' checks: the status alone
    async def health_head():
        return Response(status_code=200)

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["Both"],
        summary="Prometheus metrics",
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
            **error_docs(openai=False),
        },
    )
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def decimal_below(n: int) -> str:
    """A regular expression matching exactly the decimal numbers 0 .. n-1, without leading zeros."""
    top = str(n - 1)
    alts = ["[0-9]"] if len(top) > 1 else [f"[0-{top}]"]
    alts += [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(top))]
    if len(top) > 1:
        for i, digit in enumerate(top):
            low = "1" if i == 0 else "0"
            if digit > low:
                high = str(int(digit) - 1)
                span = low if high == low else f"[{low}-{high}]"
                rest = len(top) - i - 1
                alts.append(top[:i] + span + (f"[0-9]{{{rest}}}" if rest else ""))
        alts.append(top)
    return "^(?:" + "|".join(dict.fromkeys(alts)) + ")$"


def _finish_openapi(app: FastAPI, max_tokens: int, vocab_size: int, secured: bool, max_choices: int = 8) -> None:
    """Complete the OpenAPI document: request bodies the routes parse themselves, event payload
    schemas, the token limit, the most choices `n` may ask for (the batch size), the token ids
    `logit_bias` accepts, bearer auth."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for models, mode in ((REQUEST_MODELS, "validation"), (EVENT_MODELS, "serialization")):
            for name, model in models.items():
                if name not in components:
                    extra = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                    for def_name, definition in extra.pop("$defs", {}).items():
                        components.setdefault(def_name, definition)
                    components[name] = extra
        for component in components.values():
            for name, prop in component.get("properties", {}).items():
                if name in _TOKEN_LIMIT_FIELDS:
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = max_tokens
                if name == "n" and component.get("title") in ("ChatCompletionRequest", "CompletionRequest"):
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = max_choices
                if name == "logit_bias":
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "object":
                            branch["propertyNames"] = {"pattern": decimal_below(vocab_size)}
        for path, ops in schema.get("paths", {}).items():
            if is_openai_path(path):  # FastAPI documents a 422 it would send; these routes answer 400
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):  # drop FastAPI's error shapes once unused
            if f'"#/components/schemas/{name}"' not in json.dumps(schema):
                components.pop(name, None)
        if secured:
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema.get("paths", {}).items():
                if path != "/health":
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
