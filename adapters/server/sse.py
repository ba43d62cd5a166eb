"""Server-sent events: the response class that cancels its generation when the client leaves.

OpenAI streams write `data: {json}` and end with `data: [DONE]`; TGI streams write `data:{json}`
and have no terminator (the `text-generation` client cannot parse `[DONE]`).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Sequence

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .generation import Handle

DONE = "data: [DONE]\n\n"


def openai_event(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def tgi_event(payload: Any) -> str:
    return f"data:{json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """`text/event-stream` response whose generations (one, or a request's `n`) are cancelled
    however the response ends (finished, client disconnected, server shutting down)."""

    def __init__(self, events: AsyncIterator[str], handles: Handle | Sequence[Handle]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.handles = [handles] if isinstance(handles, Handle) else list(handles)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.cancel()


#: Models whose JSON the documented event streams carry; `app` adds them to the OpenAPI components.
EVENT_MODELS: dict[str, type] = {}


def stream_docs(model: type, description: str, done: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry for a 200 that is server-sent events when the request asks to stream.

    As OpenAPI 3.1 reads `text/event-stream`, the schema describes one event: its `data` field is
    `model` as JSON (or, when `done`, the final `[DONE]`).
    """
    EVENT_MODELS[model.__name__] = model
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"},
    }
    if done:
        data = {"anyOf": [{"type": "string", "const": "[DONE]"}, data]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": data,
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
    }
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}
