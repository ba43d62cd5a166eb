"""Base classes of request bodies, and parsing a body from its bytes (off the event loop).

Bodies are validated in pydantic's strict mode: the JSON schema we publish is what is accepted, so
`"max_tokens": "5"`, `"max_tokens": 3.5` and `"stream": 0` are 400s, not silent conversions. As in
JSON Schema 2020-12 (which our OpenAPI 3.1 document uses), an integer is a valid number and a number
with no fraction (`3.0`) a valid integer. TGI itself refuses `3.0` (serde's `u32`), but refusing it
here would contradict the published schema (`test_server_schema`'s conformance run sends such numbers).
`true` for a number field is refused with its own words.
`RequestModel` ignores unknown keys (the TGI routes: TGI's clients send fields of newer
versions); `StrictRequestModel` refuses them with a 400 that names the key (the OpenAI routes:
a field this server does not implement must not be dropped without a word).

Routes take the raw `Request` and call `parse(model, body)` in a worker thread (see
`ModelService.prepare`), so a hostile body cannot hold the event loop; lists and maps are
declared `fail_fast`, so a megabyte of wrong items costs one error, not a million.
`body_doc(model)` documents the body in the OpenAPI schema as FastAPI would have.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .errors import bad_request, validation_message

T = TypeVar("T", bound=BaseModel)

#: Request models whose JSON schema `app` adds to the OpenAPI components (see `body_doc`).
REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def _choices(annotation: Any) -> Iterator[Any]:
    """The types (and Literal values) a field's value may take at its top level."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _choices(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType, typing.Literal):
        for arg in typing.get_args(annotation):
            yield from (_choices(arg) if origin is not typing.Literal else (arg,))
    else:
        yield annotation


def _number_refusing_bool(annotation: Any) -> bool:
    choices = list(_choices(annotation))
    number = any(c is int or c is float for c in choices)
    return number and not any(c is bool or c is Any or isinstance(c, bool) for c in choices)


def _integer_only(annotation: Any) -> bool:
    choices = list(_choices(annotation))
    return any(c is int for c in choices) and not any(c is float or c is Any for c in choices)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _number_refusing_bool(annotation):
            raise ValueError("expected a number, got a boolean")
        if isinstance(value, float) and value.is_integer() and _integer_only(annotation):
            return int(value)  # JSON Schema's integer: 3.0 is one
        return value


class StrictRequestModel(RequestModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def parse(model: type[T], body: bytes) -> T:
    """Validate a JSON body; `ApiError` 400 (TGI: 422) with one readable sentence when it is wrong."""
    if not body.strip():
        raise bad_request("a JSON request body is required")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False, include_context=True, include_input=False))
        raise bad_request(message, param) from None


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` for a route that parses `model` itself: the required JSON request body."""
    REQUEST_MODELS[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
