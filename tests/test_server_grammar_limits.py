"""Grammars can never crash or hang the server: schemas and regular expressions are bounded before
llguidance sees them (`grammar_limits`), and every grammar failure is a 400 (TGI 422) with one
plain sentence, through `response_format`, TGI `parameters.grammar` and `tools` with
`tool_choice: "required"`."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
from server_fixtures import chat_body, fuzz_server, server  # noqa: F401

from torus_adapters.server.errors import ApiError
from torus_adapters.server.grammar_limits import MAX_EXPANDED_DEPTH, check_regex, check_schema


def _chain(n: int) -> dict:
    """A flat chain of `n` $refs: the body (106 KB at 3,000) that overflowed llguidance's stack."""
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


LOOPS = {
    "two names": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    "itself": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
    "through anyOf": {"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}},
    "the root": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
}
LINKED_LIST = {
    "$ref": "#/$defs/node",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
            "required": ["v", "next"],
        }
    },
}


def _refused(call, *args) -> str:
    with pytest.raises(ApiError) as info:
        call(*args, "p")
    assert info.value.status == 400 and info.value.param == "p"
    return info.value.message


def test_schemas_are_bounded_before_the_library_sees_them():
    assert "more than 512 $refs" in _refused(check_schema, _chain(3000))
    assert "levels deep once its $refs are followed" in _refused(check_schema, _chain(400))
    check_schema(_chain(MAX_EXPANDED_DEPTH // 2), "p")  # a short chain is fine
    for name, schema in LOOPS.items():
        assert "loop without describing a value" in _refused(check_schema, schema), name
    check_schema(LINKED_LIST, "p")  # recursion through a value describes finite JSON
    assert "only references inside the schema" in _refused(check_schema, {"$ref": "http://example.com/s.json"})
    assert "not in the schema" in _refused(check_schema, {"$ref": "#/$defs/missing"})
    nested: dict = {"type": "string"}
    for _ in range(100):
        nested = {"type": "array", "items": nested}
    assert "nested more than" in _refused(check_schema, nested)
    wide = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(20_000)}}
    assert "more than 20000" in _refused(check_schema, wide)
    assert "regular expression of" in _refused(check_schema, {"type": "string", "pattern": "a" * 5000})


def test_regular_expressions_are_bounded():
    check_regex(r"(yes|no), [0-9]{2}", "p")
    check_regex(r"[{]5000\{9999}", "p")  # braces in a class or escaped are no repetition
    check_regex(r"(a{10}b{20}){30}", "p")  # 20 x 30
    assert "repeats a part" in _refused(check_regex, "[0-9]{1000}{1000}")
    assert "nested repetitions multiply" in _refused(check_regex, "(x{100}){100}")
    assert "nested repetitions multiply" in _refused(check_regex, "((a{50}){50})")
    assert "regular expression of" in _refused(check_regex, "a" * 5000)


# ---------------------------------------------------------------------- the real server
def _schema_bodies(schema: dict) -> dict[str, tuple[str, dict]]:
    """The three ways a schema reaches the grammar library (one-token replies: `fuzz_server` allows
    at most two, and has the default 1 MiB body limit the 106 KB chain needs)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    return {
        "response_format": (
            "/v1/chat/completions",
            chat_body("Hi", 1, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}),
        ),
        "tools": ("/v1/chat/completions", chat_body("Hi", 1, tools=[tool], tool_choice="required")),
        "tgi grammar": (
            "/generate",
            {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "grammar": {"type": "json", "value": schema}}},
        ),
    }


def _still_serves(server: str) -> None:  # noqa: F811
    r = requests.post(f"{server}/v1/chat/completions", json=chat_body("Hi", 1), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def _plain_sentence(r: requests.Response) -> str:
    message = r.json()["error"]["message"] if r.url.count("/v1/") else r.json()["error"]
    assert "\n" not in message and len(message) < 400, message
    return message


CRASH_SCHEMAS = {"3000-ref chain": _chain(3000), **{f"loop {k}": v for k, v in LOOPS.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("case", CRASH_SCHEMAS, ids=list(CRASH_SCHEMAS))
def test_schemas_that_crashed_or_failed_the_server_are_400s_and_it_keeps_serving(fuzz_server, case):  # noqa: F811
    for route, (path, body) in _schema_bodies(CRASH_SCHEMAS[case]).items():
        r = requests.post(f"{fuzz_server}{path}", json=body, timeout=60)
        if path.startswith("/v1/"):
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (route, r.text)
        else:
            assert r.status_code == 422 and r.json()["error_type"] == "validation", (route, r.text)
        _plain_sentence(r)
    _still_serves(fuzz_server)


BAD_REGEXES = ["[0-9]{1000}{1000}", "(x{100}){100}", "a" * 5000, "(unclosed", "a{2,1}"]


@pytest.mark.slow
def test_regexes_the_library_cannot_take_are_422s_on_tgi(server):  # noqa: F811
    for pattern in BAD_REGEXES:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "grammar": {"type": "regex", "value": pattern}}}
        r = requests.post(f"{server}/generate", json=body, timeout=60)
        assert r.status_code == 422 and r.json()["error_type"] == "validation", (pattern[:20], r.text)
        assert "parameters.grammar.value" in _plain_sentence(r)
    _still_serves(server)


@pytest.mark.slow
def test_a_recursive_schema_is_enforced(server):  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "list", "schema": LINKED_LIST}}
    body = chat_body("A linked list of two numbers:", 60, response_format=fmt)
    r = requests.post(f"{server}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        value = json.loads(choice["message"]["content"])
        assert "v" in value and "next" in value


def test_a_grammar_that_crashes_or_hangs_the_library_costs_its_child_not_the_server():
    from llguidance import LLMatcher

    from torus_adapters.server.grammar_sandbox import GrammarSandbox

    sandbox = GrammarSandbox()
    try:
        ok = LLMatcher.grammar_from_json_schema({"type": "object"})
        assert sandbox.check(ok) is None
        assert "foo" in sandbox.check(LLMatcher.grammar_from_lark("start: foo"))  # in the library's words
        # the unbounded chain, past `grammar_limits`: it overflows llguidance's stack in the child
        crash = LLMatcher.grammar_from_json_schema(_chain(3000))
        assert sandbox.check(crash) == "the grammar library failed on it"
        assert sandbox.check(ok) is None  # a new child took over
        # A child that hangs, as one stuck compiling would: stopped, it cannot answer in time
        # (a tiny timeout instead raced a warm child that answered within it).
        sandbox.timeout = 0.5
        os.kill(sandbox._child().pid, signal.SIGSTOP)
        assert sandbox.check(ok) == "it took over 0.5 s to compile"
        sandbox.timeout = 10.0
        assert sandbox.check(ok) is None
    finally:
        sandbox.close()
