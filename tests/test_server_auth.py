"""Who may talk to the server: `--api-key` (every route but /health needs `Authorization: Bearer
<key>`; 401 in each client's format; blank keys refused), the Host check, and the docs switch."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import text_generation
from server_fixtures import API_KEY, fuzz_server, keyed_server, limits_server, server  # noqa: F401

from torus_adapters.server import ServerSettings
from torus_adapters.server.auth import resolve_api_key
from torus_adapters.server.hosts import allowed_hosts_for

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


# ---------------------------------------------------------------------- where the key comes from
@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_key_from_any_source_is_refused(blank, tmp_path):
    path = tmp_path / "key"
    path.write_text(blank)
    for flag, file, env in ((blank, None, {}), (None, str(path), {}), (None, None, {"TORUS_SPARSE_API_KEY": blank})):
        with pytest.raises(ValueError, match="empty or blank"):
            resolve_api_key(flag, file, env)
    with pytest.raises(ValueError, match="empty or blank"):
        ServerSettings(api_key=blank)


def test_the_key_comes_from_the_flag_the_file_or_the_environment(tmp_path):
    path = tmp_path / "key"
    path.write_text("s3cret\n")
    env = {"TORUS_SPARSE_API_KEY": "from-env"}
    assert resolve_api_key("flag-key", None, env) == "flag-key"
    assert resolve_api_key(None, str(path), env) == "s3cret"  # the file's final newline is not part of it
    assert resolve_api_key(None, None, env) == "from-env"
    assert resolve_api_key(None, None, {}) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("a", str(path), {})
    with pytest.raises(ValueError, match="cannot read"):
        resolve_api_key(None, str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="whitespace"):
        resolve_api_key(" padded", None, {})


# ---------------------------------------------------------------------- Host header (DNS rebinding)
def test_a_loopback_server_answers_only_loopback_host_names(server):  # noqa: F811
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "app.localhost", "127.0.0.2"):
        assert requests.get(f"{server}/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io"):
        r = requests.get(f"{server}/v1/models", headers={"Host": host}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        r = requests.get(f"{server}/info", headers={"Host": host}, timeout=10)
        assert r.status_code == 400
        assert isinstance(text_generation.errors.parse_error(400, r.json()), text_generation.errors.ValidationError)
        assert requests.get(f"{server}/health", headers={"Host": host}, timeout=10).status_code == 400


def test_allowed_host_adds_names(limits_server):  # noqa: F811
    for host in ("myhost.example", "MyHost.example:8443", "a.corp.example", "b.a.corp.example", "localhost"):
        assert requests.get(f"{limits_server}/health", headers={"Host": host}, timeout=10).ok, host
    for host in ("corp.example", "evilcorp.example", "myhost.example.evil", "a.corp.example.evil"):
        assert requests.get(f"{limits_server}/health", headers={"Host": host}, timeout=10).status_code == 400, host


def test_which_bind_addresses_check_the_host():
    assert allowed_hosts_for("127.0.0.1") == allowed_hosts_for("::1") == allowed_hosts_for("localhost")
    assert "localhost" in allowed_hosts_for("127.0.0.1")
    assert allowed_hosts_for("0.0.0.0") == ("*",)  # reachable by name from elsewhere: any Host
    assert allowed_hosts_for("0.0.0.0", ("api.example",))[-1] == "api.example"
    assert allowed_hosts_for("127.0.0.1", ("*",)) == ("*",)


# ---------------------------------------------------------------------- docs
def test_docs_are_off_unless_asked_for(server, fuzz_server):  # noqa: F811
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{server}{path}", timeout=10).status_code == 404, path
        assert requests.get(f"{fuzz_server}{path}", timeout=10).status_code == 200, path  # started with docs=True


# ---------------------------------------------------------------------- cross-site bodies
GENERATION_ROUTES = ["/v1/chat/completions", "/v1/completions", "/", "/generate", "/generate_stream"]
SIMPLE_TYPES = ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", None]


def test_generation_routes_take_only_json_bodies_so_a_web_page_cannot_post_to_them(fuzz_server):  # noqa: F811
    # What a page on another site can make a browser send without a CORS preflight: a "simple"
    # POST (text/plain, form or multipart, or no type). Here it carries a valid request: the
    # tools body that crashed the server through the grammar library (106 KB: the server with the
    # default 1 MiB body limit), from a foreign Origin.
    chain = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)}
    params = {"$ref": "#/$defs/d0", "$defs": {**chain, "d3000": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    bodies = {
        "/v1/chat/completions": {
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [tool],
            "tool_choice": "required",
        },
        "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
    }
    for path in GENERATION_ROUTES:
        body = json.dumps(bodies.get(path, {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}))
        for kind in SIMPLE_TYPES:
            headers = {"Origin": "https://evil.example"} | ({"Content-Type": kind} if kind else {})
            r = requests.post(f"{fuzz_server}{path}", data=body.encode(), headers=headers, timeout=60)
            assert r.status_code == 415, (path, kind, r.status_code)
            if path.startswith("/v1/"):
                assert r.json()["error"]["code"] == "unsupported_media_type"
            else:
                assert r.json()["error_type"] == "validation"
            assert "application/json" in r.text
    ok = requests.post(
        f"{fuzz_server}/v1/completions",
        data=json.dumps(bodies["/v1/completions"]).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
        timeout=60,
    )
    assert ok.status_code == 200


def test_the_key_is_checked_before_the_body_type(keyed_server):  # noqa: F811
    r = requests.post(f"{keyed_server}/generate", data=b"{}", headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 401
    r = requests.post(
        f"{keyed_server}/generate",
        data=b"{}",
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert r.status_code == 415
