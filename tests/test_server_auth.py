"""`--api-key`: every route but /health needs `Authorization: Bearer <key>`; 401 in each client's format."""

from __future__ import annotations

import openai
import pytest
import requests
import text_generation
from server_fixtures import API_KEY, keyed_server, server  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")]


def test_health_is_open_and_everything_else_needs_the_key(keyed_server):  # noqa: F811
    assert requests.get(f"{keyed_server}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/info", "/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
            r = requests.get(f"{keyed_server}{path}", headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        assert requests.get(f"{keyed_server}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).ok


def test_openai_client_with_and_without_the_key(keyed_server):  # noqa: F811
    wrong = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    reply = right.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert reply.usage.completion_tokens == 1


def test_tgi_error_format_and_client_with_the_key(keyed_server):  # noqa: F811
    r = requests.post(f"{keyed_server}/generate", json={"inputs": "Hi"}, timeout=10)
    assert r.status_code == 401 and r.json()["error_type"] == "unauthorized" and r.json()["error"]
    client = text_generation.Client(keyed_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert client.generate("Hi", max_new_tokens=1).details.generated_tokens == 1


def test_without_a_key_any_key_is_accepted(server):  # noqa: F811
    for headers in ({}, {"Authorization": "Bearer whatever"}, {"Authorization": "garbage"}):
        assert requests.get(f"{server}/v1/models", headers=headers, timeout=10).status_code == 200
