"""The FastAPI app: both wire formats over one model, plus `/health`, `/metrics` and the middleware.

Middleware, outermost first: HTTP metrics, API key (when set), body-size limit. Errors raised in
routes go through `errors.install_handlers`, so each client gets the error body it parses.
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
from .metrics import CONTENT_TYPE, HttpMetricsMiddleware, ServerMetrics
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
        scheduler = Scheduler.for_model(tm, max_batch_size=settings.max_batch_size, max_pending=settings.max_pending)
    service = ModelService(tm, scheduler, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            scheduler.close()

    app = FastAPI(
        title="torus-sparse",
        version=__version__,
        description="OpenAI- and Text-Generation-Inference-compatible server for a model whose FFN weights stream "
        "from host memory.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    metrics = ServerMetrics(service)
    app.state.metrics = metrics
    app.include_router(openai_routes.build_router(service))
    app.include_router(tgi_routes.build_router(service))
    _common_routes(app, metrics)

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    _finish_openapi(app, service.max_tokens_limit, bool(settings.api_key))
    return app


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it: the client has gone


def _common_routes(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/health", response_model=Health, tags=["Both"], summary="Liveness (never needs the API key)")
    async def health():
        return {"status": "ok"}

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


def _finish_openapi(app: FastAPI, max_tokens: int, secured: bool) -> None:
    """Complete the OpenAPI document: event payload schemas, the token limit, bearer auth."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in EVENT_MODELS.items():  # what the event streams' `data` carries
            if name not in components:
                extra = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
                for def_name, definition in extra.pop("$defs", {}).items():
                    components.setdefault(def_name, definition)
                components[name] = extra
        for component in components.values():
            for name, prop in component.get("properties", {}).items():
                if name in _TOKEN_LIMIT_FIELDS:
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = max_tokens
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
