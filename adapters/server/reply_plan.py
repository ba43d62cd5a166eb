"""What a chat request's `tools`, `tool_choice` and `response_format` ask of the decoder.

One decision, made in the prepare thread, so every refusal is a 400 naming its field before any
decoding: which tools the template renders, the grammar every choice is decoded under (if any),
and how the reply is read back (`openai_reply.ToolPlan`).

| tools / tool_choice | response_format | grammar |
|---|---|---|
| none, or "none" | text | none |
| none, or "none" | json_object / json_schema | the schema |
| "auto" | text | none; tools with `strict: true`: a call, or text not starting like one |
| "auto" | json_object / json_schema | a call, or JSON matching the schema |
| "required" | text | exactly one call of any tool, arguments matching its parameters |
| a named function | text | exactly one call of that function |

"required" or a named function together with a JSON `response_format` is refused: the reply would
have to be both a call and the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constraints import Grammar
from .errors import bad_request
from .openai_reply import ToolPlan
from .openai_schemas import ChatCompletionRequest, NamedToolChoice, ResponseFormatJsonObject, ResponseFormatJsonSchema
from .service import ModelService
from .tools import CONSTRAINABLE, FALLBACK, call_grammar


@dataclass(frozen=True)
class ReplyPlan:
    rendered: list[dict[str, Any]] = field(default_factory=list)  # tools for the chat template
    fmt: str = FALLBACK  # the model's tool-call format
    grammar: Grammar | None = None
    reading: ToolPlan | None = None  # None: the reply is plain content


def _answer_schema(body: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    rf = body.response_format
    if isinstance(rf, ResponseFormatJsonSchema):
        return (rf.json_schema.schema_ or {}), "response_format.json_schema.schema"
    if isinstance(rf, ResponseFormatJsonObject):
        return {"type": "object"}, "response_format"
    return None


def plan_tools(service: ModelService, body: ChatCompletionRequest) -> ReplyPlan:
    """The plan for `body`; `ApiError` 400 naming the field when it cannot be honoured."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    answer = _answer_schema(body)
    if not tools or choice == "none":
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice names a tool, but the request has no tools", "tool_choice")
        if answer is None:
            return ReplyPlan()
        return ReplyPlan(grammar=service.grammars.json_schema(*answer))

    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", "tools")
    fmt = service.tool_format
    if fmt is None:
        raise bad_request(
            "this model's chat template renders tools in a format this server cannot read calls back from "
            "(it knows Hermes/Qwen <tool_call>, Llama 3 JSON and Mistral [TOOL_CALLS]); send the request without tools",
            "tools",
        )
    reading = ToolPlan(fmt, frozenset(names), parallel=body.parallel_tool_calls is not False)
    must = tools if choice == "required" else None
    if isinstance(choice, NamedToolChoice):
        must = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not must:
            raise bad_request(
                f"tool_choice names the function {choice.function.name!r}, which is not among tools "
                f"({', '.join(names)})",
                "tool_choice",
            )
    if must is not None and answer is not None:
        raise bad_request(
            "response_format cannot be JSON when tool_choice requires a call (the reply is the call); "
            "use tool_choice auto, or leave response_format out",
            "response_format",
        )
    strict = any(t["function"].get("strict") for t in tools)
    if must is None and answer is None and not strict:
        return ReplyPlan(tools, fmt, None, reading)
    if fmt not in CONSTRAINABLE:
        raise bad_request(
            f"constraining tool calls (tool_choice required or named, strict tools, or a JSON response_format with "
            f"tools) is supported for the Hermes/Qwen and Llama 3 formats; this model writes calls in the {fmt} format",
            "tool_choice",
        )
    for i, tool in enumerate(must or tools):  # name the tool whose parameters cannot compile
        if tool["function"].get("parameters") is not None:
            index = tools.index(tool) if must is not None else i
            service.grammars.json_schema(tool["function"]["parameters"], f"tools[{index}].function.parameters")
    if answer is not None:  # bounded and compiled alone first, so its errors name its field
        service.grammars.json_schema(*answer)
    source = call_grammar(must or tools, fmt, None if must is not None else (answer[0] if answer else "text"))
    grammar = service.grammars.lark(source, answer[1] if answer else "tools")
    return ReplyPlan(tools, fmt, grammar, reading)
