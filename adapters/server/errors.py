"""Error bodies in the shape each client parses, and the handlers that produce them.

Routes under `/v1/` answer OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`
(400 for bad input). Every other route answers TGI's `{"error": msg, "error_type": kind}` (422 for
bad input), which `text_generation` and `huggingface_hub` turn into typed exceptions; FastAPI's
default `{"detail": ...}` would break both.

Messages are written for the client: an unexpected exception's text (which can name files,
layers or devices) goes to the server log under a reference, and the client gets the reference.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_TGI_TYPES = {
    401: "unauthorized",
    404: "not_found",
    405: "not_found",
    429: "overloaded",
    503: "overloaded",
    424: "generation",
}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


class ApiError(Exception):
    """An error a route reports to its client. `status` is the OpenAI-side status; TGI routes use
    422 for every input error (`error_type` "validation") unless `tgi_status` says otherwise."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        tgi_status: int | None = None,
        tgi_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.tgi_status = tgi_status if tgi_status is not None else (422 if status == 400 else status)
        self.tgi_type = tgi_type or _TGI_TYPES.get(
            self.tgi_status, "validation" if self.tgi_status < 500 else "generation"
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def shutting_down(message: str = "the server is shutting down; retry on another replica or later") -> ApiError:
    return ApiError(503, message, code="server_shutting_down", tgi_status=503, tgi_type="overloaded")


def log_reference(logger: logging.Logger, what: str) -> str:
    """Log the exception being handled (traceback and all) under a new short reference; return it."""
    ref = secrets.token_hex(4)
    logger.exception("%s (reference %s)", what, ref)
    return ref


def internal_error(what: str) -> ApiError:
    """Log the exception being handled; the client's message names only the reference."""
    ref = log_reference(log, what)
    return ApiError(
        500, f"internal server error (reference {ref}; the server log has the details)", tgi_type="generation"
    )


def openai_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def tgi_body(message: str, error_type: str) -> dict[str, Any]:
    return {"error": message, "error_type": error_type}


def error_response(path: str, err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    if is_openai_path(path):
        return JSONResponse(openai_body(err.status, err.message, err.param, err.code), err.status, headers=headers)
    return JSONResponse(tgi_body(err.message, err.tgi_type), err.tgi_status, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, str) and part[:1].isupper() and part.isidentifier():
            continue  # a union member's tag (request fields are lower case), not a field
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence (and the offending parameter) from pydantic/FastAPI errors."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        reason = (e.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + reason if reason else ''}", None
    where = _loc(tuple(e.get("loc", ())))
    if not where:
        if e.get("type") == "missing":
            return "a JSON request body is required", None
        return "the request body must be a JSON object", None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    msg = _PLAIN.get(e.get("type", ""), e.get("msg") or "")
    if e.get("type") == "value_error":  # a validator's own sentence, without pydantic's prefix
        msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}{more}", where


#: Clearer words than pydantic's for the errors that mean "this server does not do that".
_PLAIN = {
    "extra_forbidden": "unknown parameter: this server does not support it (leave it out)",
    "none_required": "not supported by this server (leave it out or send null)",
}


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    return error_response(request.url.path, bad_request(message, param))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    return error_response(request.url.path, ApiError(exc.status_code, str(exc.detail)), headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request.url.path, internal_error(f"unhandled error on {request.url.path}"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


# ---------------------------------------------------------------------- documented shapes
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    error: OpenAIErrorDetail


class TGIError(BaseModel):
    """Text-Generation-Inference's error object."""

    error: str
    error_type: str


def error_docs(openai: bool) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting every error status a route can answer."""
    model = OpenAIError if openai else TGIError
    statuses = {
        400: "Malformed or invalid request, or a Host header the server does not answer"
        if openai
        else "Malformed request, or a Host header the server does not answer",
        401: "Missing or wrong API key (only when the server has one)",
        404: "Not found",
        405: "Method not allowed",
        408: "The request body did not arrive in time",
        413: "Request body too large",
        415: "The body is not declared application/json",
        431: "The request head is over 16 KiB or 100 headers",
        422: "Invalid request",
        424: "Generation failed",
        429: "Too many requests in flight",
        500: "Internal error",
        503: "The server is shutting down",
    }
    if openai:  # these routes answer 400 for any bad input and 500 when generation fails
        statuses.pop(422)
        statuses.pop(424)
    return {code: {"model": model, "description": text} for code, text in statuses.items()}
