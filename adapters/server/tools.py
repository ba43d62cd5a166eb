"""OpenAI tools on a chat template: rendering the tools and the calls in the history, the grammar
that makes a call valid, and reading the calls back out of the reply.

A model's tool-call format is read from its chat template, once:

- the template renders `tools` and writes `<tool_call>` (Hermes, Qwen 2.5/3): `HERMES`;
- it renders `tools` and writes `[TOOL_CALLS]` (Mistral): `MISTRAL`;
- it renders `tools` and writes `<|python_tag|>` / `ipython` (Llama 3.1+): `LLAMA3`, a bare JSON
  object `{"name": ..., "parameters": {...}}`;
- it does not render `tools` at all (SmolLM2, most small chat models): `FALLBACK`, which renders the
  tools into the system turn in the Hermes format below and parses the Hermes way. A template that
  renders tools in a format none of these names is refused (the calls could not be read back).

The fallback format (Qwen 2.5's wording): the system turn gains

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
    </tools>

    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

an assistant turn with `tool_calls` is written as its content followed by one such `<tool_call>`
block per call, and consecutive `tool` messages become one user turn of
`<tool_response>\\n...\\n</tool_response>` blocks. `developer` turns are system turns everywhere.

`tool_choice` "required" or a named function constrains decoding (`constraints.py`) to exactly one
call in the model's format whose arguments match the function's `parameters`; "auto" leaves the
model free and parses what it writes; "none" renders no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from .constraints import JSON_LAYOUT
from .errors import bad_request

HERMES, MISTRAL, LLAMA3, FALLBACK = "hermes", "mistral", "llama3", "fallback"
#: Formats whose calls `call_grammar` can constrain.
CONSTRAINABLE = (HERMES, LLAMA3, FALLBACK)

_FALLBACK_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_FALLBACK_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def template_format(template: str | None) -> str | None:
    """The tool-call format of a chat template; None when it renders tools in a format not known here."""
    if not template:
        return FALLBACK
    try:
        from jinja2 import Environment, meta

        uses_tools = "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:  # a template jinja2 cannot parse: tm.encode will say so
        uses_tools = False
    if not uses_tools:
        return FALLBACK
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return None


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise bad_request(f"{param} must be a JSON object, as text (it is not valid JSON)", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON object, as text", param)
    return value


def render_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]], fmt: str) -> list[dict]:
    """The messages as the chat template takes them. `messages` are OpenAI messages as dicts;
    `tools` the OpenAI tool definitions to render ([] for none)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content") or ""
        calls = m.get("tool_calls") or []
        if fmt != FALLBACK:  # the template renders calls and results itself (arguments as a dict)
            item: dict[str, Any] = {"role": role, "content": content}
            if calls:
                item["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments(
                                c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments"
                            ),
                        },
                    }
                    for j, c in enumerate(calls)
                ]
            if role == "tool" and m.get("tool_call_id"):
                item["tool_call_id"] = m["tool_call_id"]
            out.append(item)
            continue
        if calls:
            blocks = []
            for j, c in enumerate(calls):
                args = _arguments(c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments")
                call = {"name": c["function"]["name"], "arguments": args}
                blocks.append(f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
            content = "\n".join(([content] if content else []) + blocks)
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        out.append({"role": role, "content": content})
    for item in out:
        item.pop("_tool_results", None)
    if fmt == FALLBACK and tools:
        listing = _FALLBACK_INTRO + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + _FALLBACK_OUTRO
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + listing).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if params is not None else {"type": "object", "properties": {}}


def _hoisted(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """`schema` with its `$defs` / `definitions` moved into `defs` under `prefix` and its local
    references rewritten: nested inside a call's schema, "#/$defs/X" would point at the wrong root."""
    if isinstance(schema, list):
        return [_hoisted(item, prefix, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, definition in value.items():
                defs[f"{prefix}{name}"] = _hoisted(definition, prefix, defs)
        elif key == "$ref" and isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/")):
            out[key] = f"#/$defs/{prefix}{value.split('/', 2)[2]}"
        else:
            out[key] = _hoisted(value, prefix, defs)
    return out


def call_grammar(tools: Sequence[dict[str, Any]], fmt: str, answer: dict[str, Any] | str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call of one of `tools` in format `fmt`.

    answer: what the reply may be instead of a call: None (a call is required), "text" (any text
    that does not begin like a call), or a JSON schema the answer must match."""
    key = "parameters" if fmt == LLAMA3 else "arguments"
    defs: dict[str, Any] = {}
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, key: _hoisted(_parameters(t), f"t{i}_", defs)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for i, t in enumerate(tools)
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
    call = f"%json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT}, ensure_ascii=False)}"
    if fmt != LLAMA3:
        call = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
    if answer is None:
        return f"start: call\ncall: {call}\n"
    if answer == "text":
        first = "{" if fmt == LLAMA3 else "<"
        alternative = f"ANSWER\nANSWER: /[^{re.escape(first)}][\\s\\S]*/"
    else:
        alternative = f"answer\nanswer: %json {json.dumps({**answer, 'x-guidance': JSON_LAYOUT}, ensure_ascii=False)}"  # type: ignore[dict-item]
    return f"start: call | {alternative}\ncall: {call}\n"


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call(obj: Any, names: frozenset[str], keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def parse_calls(text: str, fmt: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    """(content before the calls, calls) when `text` holds tool calls in format `fmt`, all of them
    well-formed calls of known tools; None otherwise (the text is then plain content)."""
    if fmt in (HERMES, FALLBACK):
        start = text.find("<tool_call>")
        if start < 0:
            return None
        calls = []
        for block in _HERMES_BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(block), names)
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
        return (text[:start].strip(), calls) if calls else None
    if fmt == MISTRAL:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return None
        body = text[start + len("[TOOL_CALLS]") :].strip()
        calls = []
        if body.startswith("["):  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            try:
                items = json.loads(body)
            except ValueError:
                return None
            items = items if isinstance(items, list) else [items]
        else:  # newer tokenizers: [TOOL_CALLS]name[ARGS]{...} per call
            items = []
            for part in body.split("[TOOL_CALLS]"):
                name, sep, args = part.partition("[ARGS]")
                if not sep:
                    return None
                try:
                    items.append({"name": name.strip(), "arguments": json.loads(args)})
                except ValueError:
                    return None
        for item in items:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)
        return (text[:start].strip(), calls) if calls else None
    if fmt == LLAMA3:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return None
        calls = []
        for part in body.split(";"):  # Llama 3 separates parallel calls with ';'
            try:
                call = _call(json.loads(part), names, ("parameters", "arguments"))
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
        return "", calls
    return None


def call_start(fmt: str) -> str:
    """The text a call begins with in `fmt` (a stream holds back what could be its start)."""
    return {HERMES: "<tool_call>", FALLBACK: "<tool_call>", MISTRAL: "[TOOL_CALLS]", LLAMA3: "{"}[fmt]
