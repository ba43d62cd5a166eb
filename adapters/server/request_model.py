"""Base class of request bodies: unknown keys ignored, and no boolean where a number belongs.

Pydantic's lax mode reads `true` as 1 for a number field; the JSON schema we publish says a
number, and clients that send `"temperature": true` have a bug worth a 4xx, not a silent 1.0.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _allows_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any or isinstance(annotation, bool):  # bool, or Literal[False]
        return True
    return any(_allows_bool(a) for a in typing.get_args(annotation))


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and not _allows_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value
