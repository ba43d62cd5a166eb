"""OpenAI tools on the real server and model, through the clients agents use: `openai` (a whole
agent loop), `langchain-openai` (bind_tools, with_structured_output) and `litellm`; and the tool
formats themselves (rendering, parsing) on plain strings.

The embedded SmolLM2's template has no tool support, so the server renders tools in its
documented fallback (Hermes) format; a call forced by `tool_choice` is constrained decoding and
must be valid every time. What the small model chooses under "auto" is its judgement: tested for
format only.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from server_fixtures import server  # noqa: F401

from torus_adapters.server.tools import FALLBACK, HERMES, LLAMA3, MISTRAL, parse_calls, render_messages, template_format

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "add": TOOLS[1]["function"]["parameters"]}
ASKS = ["What is the weather in Paris?", "Is it raining in Tokyo?", "What is 2 plus 3?"]


# ---------------------------------------------------------------------- formats, no model
def test_template_format_is_read_from_the_template():
    assert template_format(None) == FALLBACK
    assert template_format("{% for m in messages %}{{ m.content }}{% endfor %}") == FALLBACK
    assert template_format("{% if tools %}<tool_call>{{ tools }}{% endif %}") == HERMES
    assert template_format("{% if tools %}[TOOL_CALLS]{% endif %}") == MISTRAL
    assert template_format("{% if tools %}<|python_tag|>{% endif %}") == LLAMA3
    assert template_format("{% if tools %}{{ tools }}<call>{% endif %}") is None  # refused by the server


NAMES = frozenset({"get_weather", "add"})


def test_calls_are_parsed_in_each_format_and_anything_else_is_content():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, (call,) = parse_calls(text, HERMES, NAMES)
    assert content == "Let me check." and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert (
        len(
            parse_calls(
                text + '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', HERMES, NAMES
            )[1]
        )
        == 2
    )
    (_, (call,)) = parse_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', LLAMA3, NAMES)
    assert json.loads(call.arguments) == {"a": 1, "b": 2}
    (_, (call,)) = parse_calls('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', MISTRAL, NAMES)
    assert call.name == "add"
    (_, (call,)) = parse_calls('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', MISTRAL, NAMES)
    assert json.loads(call.arguments) == {"a": 1, "b": 2}
    for text, fmt in [
        ("Paris is sunny.", HERMES),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', HERMES),  # cut short
        ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', HERMES),  # not a tool it was given
        ("{not json", LLAMA3),
        ("[TOOL_CALLS]oops", MISTRAL),
    ]:
        assert parse_calls(text, fmt, NAMES) is None, text


def test_the_fallback_renders_tools_calls_and_results_into_plain_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
    ]
    out = render_messages(history, TOOLS, FALLBACK)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n3\n</tool_response>\n<tool_response>\nok\n</tool_response>"


# ---------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:  # noqa: F811
    return openai.OpenAI(base_url=f"{server}/v1", api_key="anything", max_retries=0, timeout=120)


def _valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.slow
def test_openai_agent_loop_required_calls_are_always_valid(client):
    def ask(question: str):
        return client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": question}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=60,
            temperature=0,
        )

    with ThreadPoolExecutor(len(ASKS)) as pool:  # decoded together, each under its own grammar
        replies = list(pool.map(ask, ASKS))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _valid(choice.message.tool_calls[0])
    first = replies[0].choices[0].message
    call = first.tool_calls[0]
    # the agent runs the tool and sends the result back; the model answers in text
    history = [
        {"role": "user", "content": ASKS[0]},
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(
        model="x", messages=history, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_a_named_tool_streams_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Add 40 and 2."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "add"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMAS["add"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_auto_replies_are_either_content_or_valid_calls_streamed_alike(client):
    kw = dict(model="x", messages=[{"role": "user", "content": ASKS[0]}], tools=TOOLS, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    if whole.message.tool_calls:
        assert whole.finish_reason == "tool_calls"
        for call in whole.message.tool_calls:
            assert call.function.name in SCHEMAS and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert whole.message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


BAD_TOOLS = {
    "tool_choice": dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
    "tools[1].function.parameters": dict(
        tools=[TOOLS[0], {**TOOLS[1], "function": {**TOOLS[1]["function"], "parameters": {"type": "objekt"}}}],
        tool_choice="required",
    ),
    "response_format": dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
    "tools": dict(tools=[TOOLS[0], TOOLS[0]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("param", BAD_TOOLS)
def test_tool_requests_that_cannot_be_honoured_are_a_400_naming_the_field(client, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **BAD_TOOLS[param]
        )
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.slow
def test_langchain_bind_tools_and_structured_output(server):  # noqa: F811
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city (unit: celsius or fahrenheit)."""
        return "sunny"

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population_millions: int = Field(ge=0, le=100)

    llm = ChatOpenAI(
        base_url=f"{server}/v1", api_key="anything", model="x", temperature=0, max_tokens=60, max_retries=0
    )
    calls = llm.bind_tools([get_weather], tool_choice="get_weather").batch(["Weather in Rome?", "Is it cold in Oslo?"])
    for message in calls:
        (call,) = message.tool_calls
        assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    cities = llm.with_structured_output(City).batch(["Tell me about Paris.", "Describe Tokyo."])
    assert all(isinstance(c, City) for c in cities)


@pytest.mark.slow
def test_litellm_with_tools(server):  # noqa: F811
    import litellm

    reply = litellm.completion(
        model="openai/x",
        api_base=f"{server}/v1",
        api_key="anything",
        messages=[{"role": "user", "content": ASKS[2]}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    _valid(call)
