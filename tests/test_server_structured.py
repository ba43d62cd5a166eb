"""Structured output, logprobs and n > 1 on the real server and model: OpenAI's `response_format`
(json_object, json_schema), TGI's `grammar` through `huggingface_hub.InferenceClient`, logprobs
checked against the model's own logits, and several choices decoded together."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests
import torch
from huggingface_hub import InferenceClient
from server_fixtures import hub_online, server, server_model  # noqa: F401

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a user of a web site as JSON.",
    "Invent a person and give their details.",
    "Who is the administrator? Answer in JSON.",
    "Tell me about a guest.",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:  # noqa: F811
    return openai.OpenAI(base_url=f"{server}/v1", api_key="anything", max_retries=0, timeout=120)


def test_json_schema_replies_always_validate_while_a_free_request_shares_the_batch(client, server_model):  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def constrained(prompt: str) -> str:
        reply = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0, response_format=fmt
        )
        assert reply.choices[0].finish_reason == "stop"  # ended because the schema was complete
        return reply.choices[0].message.content

    def free() -> str:
        return client.chat.completions.create(model="x", messages=QUESTION, max_tokens=6, temperature=0)

    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        free_reply = pool.submit(free)
        replies = list(pool.map(constrained, PROMPTS))
    for text in replies:
        jsonschema.validate(json.loads(text), PERSON)
        assert text == json.dumps(json.loads(text))  # the documented layout: json.dumps' separators
    # the free request decoded in the same batches is what the model says alone
    assert free_reply.result().choices[0].message.content == server_model.generate(QUESTION, max_new_tokens=6)


def test_json_object_streams_one_object(client):
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=[
                {"role": "user", "content": 'What is the capital of France? Reply as JSON with the key "capital".'}
            ],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_object"},
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)


BAD_FORMATS = {
    "response_format.json_schema.schema": {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "strng"}},
    },
    "response_format": {"type": "yaml"},
}


@pytest.mark.parametrize("param", BAD_FORMATS)
def test_a_schema_that_cannot_compile_is_a_400_naming_the_field(client, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=QUESTION, max_tokens=2, response_format=BAD_FORMATS[param])
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def _first_token_logprobs(server_model, messages, temperature: float) -> torch.Tensor:  # noqa: F811
    ids = server_model.encode(messages, chat=True)["input_ids"]
    with torch.inference_mode():
        logits = server_model.model(input_ids=ids).logits[0, -1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_logprobs_are_those_of_the_distribution_sampled_from(client, server_model):  # noqa: F811
    greedy = client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    content = greedy.choices[0].logprobs.content
    assert "".join(t.token for t in content) == greedy.choices[0].message.content
    expected = _first_token_logprobs(server_model, QUESTION, 1.0)
    best = torch.topk(expected, 3)
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert first.logprob == first.top_logprobs[0].logprob  # greedy: the most likely token
    assert bytes(first.bytes).decode() == first.token

    hot = client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=1, temperature=0.5, seed=7, logprobs=True, top_logprobs=1
    )
    token = hot.choices[0].logprobs.content[0]
    scaled = _first_token_logprobs(server_model, QUESTION, 0.5)
    chosen = server_model.tokenizer.encode(token.token, add_special_tokens=False)
    assert token.logprob == pytest.approx(float(scaled[chosen[0]]), abs=1e-4)  # after temperature

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=QUESTION, max_tokens=1, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_n_choices_decode_together_and_stream_interleaved(client):
    kw = dict(model="x", messages=QUESTION, max_tokens=4, temperature=1.0, seed=11)
    reply = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 12 or all(c.finish_reason == "stop" for c in reply.choices)
    # choice 0 is the request with that seed alone; the others use seed + i
    alone = client.chat.completions.create(**kw).choices[0].message.content
    assert reply.choices[0].message.content == alone
    assert (
        client.chat.completions.create(**{**kw, "seed": 12}).choices[0].message.content
        == reply.choices[1].message.content
    )

    chunks = list(
        client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, **kw)
    )
    texts, tokens = {0: "", 1: ""}, {0: 0, 1: 0}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            tokens[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
    assert texts == {i: reply.choices[i].message.content for i in (0, 1)}
    assert chunks[-1].usage.completion_tokens == tokens[0] + tokens[1]  # both choices counted, the prompt once
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_completions_logprobs_and_n(client):
    out = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2, n=2
    )
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == out.choices[1].text  # greedy
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = list(
        client.completions.create(
            model="x", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=0, stream=True
        )
    )
    assert [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])] == lp.tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="x", prompt="Hi", max_tokens=1, logprobs=1, echo=True)
    assert info.value.body["param"] == "logprobs"


def test_tgi_grammar_json_and_regex(server, hub_online):  # noqa: F811
    hub = InferenceClient(base_url=server)
    for prompt in ("A user record:", "Here is a guest as JSON:"):
        text = hub.text_generation(prompt, max_new_tokens=40, grammar={"type": "json", "value": PERSON})
        jsonschema.validate(json.loads(text), PERSON)
    pattern = r"(yes|no), [0-9]{2}"
    r = requests.post(
        f"{server}/generate",
        json={
            "inputs": "Is Paris in France?",
            "parameters": {"max_new_tokens": 10, "grammar": {"type": "regex", "value": pattern}},
        },
        timeout=120,
    )
    assert r.status_code == 200 and re.fullmatch(pattern, r.json()["generated_text"])
