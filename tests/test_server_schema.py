"""Schemathesis over the server's own /openapi.json, all its checks: no 5xx, every answer documented
(status, content type, body and event-stream schemas), valid requests accepted, invalid ones refused.

The fuzz server caps generations at 2 tokens (its schema documents the cap). Examples are
derandomized, so the run is the same every time: no generated prompt comes near the 8192-token
context, the one limit a JSON schema cannot state.
(`schemathesis.pytest.from_fixture` does not work under pytest 9, so each operation is driven
with `as_strategy` and hypothesis directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_fixtures import fuzz_server  # noqa: F401

pytestmark = pytest.mark.slow

OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/"),
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("GET", "/info"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):  # noqa: F811
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


def test_every_operation_is_covered(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


#: Request fields whose validity no JSON schema can state: a tool_choice naming a tool that is not
#: in `tools`, a JSON Schema or regex the grammar library cannot compile, top_logprobs without
#: logprobs, tool-call arguments that are not JSON text. Bodies with them are refused with a 400 naming the field (tested in
#: test_server_tools / test_server_structured), so here they are held to every check but
#: "schema-valid data is accepted".
SEMANTIC_FIELDS = ("tools", "tool_choice", "response_format", "top_logprobs", "logprobs", "grammar")


def _semantic(body, tokenizer) -> bool:
    """Whether `body` holds a field of SEMANTIC_FIELDS, or a prompt made only of characters the
    tokenizer drops (no tokens to generate from: 400 / 422 "must not be empty")."""
    if not isinstance(body, dict):
        return False
    prompt = body.get("inputs", body.get("prompt"))
    if isinstance(prompt, str) and prompt and not tokenizer(prompt)["input_ids"]:
        return True
    params = body.get("parameters")
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    return (
        any(body.get(f) is not None for f in SEMANTIC_FIELDS)
        or (isinstance(params, dict) and params.get("grammar") is not None)
        or any(isinstance(m, dict) and m.get("tool_calls") for m in messages)
    )


CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE)
    for m, p in OPERATIONS
    if m == "POST"  # GETs take no input to get wrong
]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_openapi_conformance(api_schema, method, path, mode, smollm2_tokenizer):
    operation = api_schema[path][method]
    examples = 1 if method == "GET" and "{" not in path else 10

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports its first example
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        excluded = [positive_data_acceptance] if _semantic(case.body, smollm2_tokenizer) else []
        case.call_and_validate(timeout=60, excluded_checks=excluded)

    check()
