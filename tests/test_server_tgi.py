"""Text-Generation-Inference wire format, driven by `text_generation.Client` and
`huggingface_hub.InferenceClient` against a real server and model."""

from __future__ import annotations

import pytest
import requests
import text_generation
from huggingface_hub import InferenceClient
from huggingface_hub import errors as hub_errors
from server_fixtures import hub_online, server, server_model  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def expected(server_model) -> str:  # noqa: F811
    return server_model.generate(PROMPT, max_new_tokens=4, chat=False)


def test_text_generation_client(server, expected):  # noqa: F811
    client = text_generation.Client(server, timeout=60)
    out = client.generate(PROMPT, max_new_tokens=4)
    assert out.generated_text == expected
    d = out.details
    assert d.finish_reason.value in ("length", "eos_token") and d.generated_tokens == len(d.tokens) == 4
    assert d.prefill == [] and all(isinstance(t.id, int) and not t.special for t in d.tokens)

    events = list(client.generate_stream(PROMPT, max_new_tokens=4))
    assert "".join(e.token.text for e in events) == expected
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == 4
    assert all(e.generated_text is None for e in events[:-1])


def test_inference_client_text_generation(server, expected, hub_online):  # noqa: F811
    client = InferenceClient(base_url=server, timeout=60)
    assert client.text_generation(PROMPT, max_new_tokens=4) == expected
    detailed = client.text_generation(PROMPT, max_new_tokens=4, details=True)
    assert detailed.generated_text == expected and detailed.details.generated_tokens == 4
    assert "".join(client.text_generation(PROMPT, max_new_tokens=4, stream=True)) == expected
    events = list(client.text_generation(PROMPT, max_new_tokens=4, stream=True, details=True))
    assert events[-1].generated_text == expected and events[-1].details.finish_reason in ("length", "eos_token")


def test_inference_client_chat_completion(server, server_model, hub_online):  # noqa: F811
    client = InferenceClient(base_url=server, timeout=60)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = server_model.generate(messages, max_new_tokens=5)
    out = client.chat_completion(messages, max_tokens=5, temperature=0)
    assert out.choices[0].message.content == want and out.model == "smollm2-test"
    chunks = list(client.chat_completion(messages, max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    with pytest.raises(hub_errors.BadRequestError, match="role"):
        client.chat_completion([{"role": "wizard", "content": "hi"}], max_tokens=1)


def test_tgi_routes_and_parameters(server, expected):  # noqa: F811
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    r = requests.post(f"{server}/generate", json=body, timeout=60).json()
    assert r == {"generated_text": expected, "details": None}
    full = requests.post(
        f"{server}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": 2,
                "return_full_text": True,
                "details": True,
                "decoder_input_details": True,
            },
        },
        timeout=60,
    ).json()
    assert full["generated_text"].startswith(PROMPT)
    assert "".join(t["text"] for t in full["details"]["prefill"]) == PROMPT
    stop = requests.post(
        f"{server}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "stop": ["."], "details": True}},
        timeout=60,
    ).json()
    if "." in expected:  # TGI keeps the stop string in the reply
        assert stop["generated_text"] == expected[: expected.index(".") + 1]
        assert stop["details"]["finish_reason"] == "stop_sequence"
    info = requests.get(f"{server}/info", timeout=10).json()
    assert info["model_id"] == "smollm2-test" and info["max_total_tokens"] == 8192


LONG = "hi " * 9000

BAD_TGI = {
    "missing inputs": {"parameters": {"max_new_tokens": 1}},
    "empty inputs": {"inputs": ""},
    "inputs not a string": {"inputs": ["a"]},
    "max_new_tokens 0": {"inputs": "hi", "parameters": {"max_new_tokens": 0}},
    "max_new_tokens beyond the context": {"inputs": "hi", "parameters": {"max_new_tokens": 8192}},
    "temperature 0": {"inputs": "hi", "parameters": {"temperature": 0}},
    "top_p 1": {"inputs": "hi", "parameters": {"top_p": 1.0}},
    "top_k 0": {"inputs": "hi", "parameters": {"top_k": 0}},
    "prompt longer than the context": {"inputs": LONG},
    "grammar that cannot compile": {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "[a-"}}},
    "grammar of unknown type": {"inputs": "hi", "parameters": {"grammar": {"type": "ebnf", "value": "a"}}},
    "boolean as a number": {"inputs": "hi", "parameters": {"frequency_penalty": True}},
}


@pytest.mark.parametrize("case", BAD_TGI, ids=list(BAD_TGI))
def test_bad_tgi_input_is_a_422_the_clients_type(server, case):  # noqa: F811
    r = requests.post(f"{server}/", json=BAD_TGI[case], timeout=30)
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation" and body["error"]
    assert isinstance(text_generation.errors.parse_error(r.status_code, body), text_generation.errors.ValidationError)
    _still_serves(server)


def test_bad_input_through_the_clients(server, hub_online):  # noqa: F811
    with pytest.raises(hub_errors.ValidationError, match="max_new_tokens"):
        InferenceClient(base_url=server).text_generation("hi", max_new_tokens=100_000)
    with pytest.raises(text_generation.errors.ValidationError, match="context"):
        text_generation.Client(server).generate(LONG, max_new_tokens=1)


def test_malformed_json_and_oversized_body(server):  # noqa: F811
    for route in ("/", "/generate", "/generate_stream"):
        r = requests.post(
            f"{server}{route}", data=b'{"inputs": ', headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == 422 and r.json()["error_type"] == "validation" and "JSON" in r.json()["error"]
    r = requests.post(f"{server}/generate", json={"inputs": "x" * 70_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
    _still_serves(server)


def _still_serves(server: str) -> None:  # noqa: F811
    r = requests.post(f"{server}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}}, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"] is not None
