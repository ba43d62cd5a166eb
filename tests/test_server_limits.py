"""What bounds one client's hold on the server: preparation off the event loop, --max-pending,
connection deadlines and the concurrency cap, --max-input-tokens / --max-total-tokens."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import text_generation
from server_fixtures import LIMITS, ServerThread, _scheduler, limits_server, server_model  # noqa: F401

from torus_adapters.server import ServerSettings, create_app
from torus_plugins import TorusModel

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")]


# ---------------------------------------------------------------------- preparation off the loop
class _HeldTokenizing(TorusModel):
    """The shared SmolLM2, whose tokenizing of a prompt holding "HOLD" waits until released."""

    def __init__(self, tm: TorusModel) -> None:
        super().__init__(tm.model, tm.tokenizer)
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, prompt, chat=None):
        if "HOLD" in str(prompt):
            self.entered.set()
            self.release.wait(60)
        return super().encode(prompt, chat)


def test_a_request_stuck_in_tokenizing_does_not_stop_other_clients(server_model):  # noqa: F811
    # Tokenizing (like parsing, validating and templating) runs in a worker thread: while one
    # request's tokenizer is held, the event loop keeps streaming another client's tokens and
    # answering new requests (prepared by the second worker). Were it on the loop, nothing else
    # could be answered until the hold ends.
    held = _HeldTokenizing(server_model)
    srv = ServerThread(create_app(held, ServerSettings(model_name="held"), scheduler=_scheduler()))
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "logit_bias": {"0": -100, "2": -100}}
    try:
        with requests.post(f"{srv.url}/v1/completions", json=body, stream=True, timeout=30) as stream:
            events = (line for line in stream.iter_lines() if line.startswith(b"data:"))
            next(events)
            with ThreadPoolExecutor(1) as pool:
                stuck = pool.submit(
                    requests.post,
                    f"{srv.url}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "HOLD on"}], "max_tokens": 1},
                    timeout=120,
                )
                assert held.entered.wait(30)
                try:
                    for _ in range(5):
                        next(events)  # the stream goes on (each read would time out otherwise)
                    assert requests.get(f"{srv.url}/health", timeout=10).ok
                    r = requests.post(
                        f"{srv.url}/v1/completions",
                        json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
                        timeout=10,
                    )
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
                    assert not stuck.done()
                finally:
                    held.release.set()
                assert stuck.result().status_code == 200
    finally:
        srv.stop()


def test_a_megabyte_of_wrong_items_is_one_clear_error(limits_server):  # noqa: F811
    body = b'{"messages": [' + b",".join([b"1"] * 300_000) + b"]}"
    r = requests.post(
        f"{limits_server}/v1/chat/completions", data=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "messages[0]: Input should be an object"


# ---------------------------------------------------------------------- --max-pending
def test_max_pending_counts_requests_while_they_are_prefilled(server_model):  # noqa: F811
    # 16 clients at once against --max-pending 4 --max-batch-size 4, long prompts (slow prefill):
    # exactly 4 are accepted, although requests being prefilled are neither waiting nor decoding.
    srv = ServerThread(create_app(server_model, ServerSettings(model_name="busy", max_pending=4, max_batch_size=4)))
    prompt = "Describe the sea at night in great detail. " * 40  # ~400 tokens
    statuses: list[int] = []
    all_in = threading.Barrier(16, timeout=120)

    def client() -> None:
        with requests.post(
            f"{srv.url}/v1/completions",
            json={"prompt": prompt, "max_tokens": 300, "stream": True},
            stream=True,
            timeout=120,
        ) as r:
            statuses.append(r.status_code)
            all_in.wait()  # accepted streams stay open until every client has its answer

    try:
        with ThreadPoolExecutor(16) as pool:
            for f in [pool.submit(client) for _ in range(16)]:
                f.result()
        assert sorted(statuses) == [200] * 4 + [429] * 12
        # the closed streams are cancelled, the slots free again
        deadline = time.monotonic() + 60
        while srv.app.state.service.scheduler.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        srv.stop()


# ---------------------------------------------------------------------- connection deadlines
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)  # a guard: the server must act long before
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_connections_that_do_not_finish_their_request_head_are_closed(limits_server):  # noqa: F811
    silent = _connect(limits_server)
    slow = _connect(limits_server)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and never the rest
    conn = http.client.HTTPConnection(limits_server.removeprefix("http://"), timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b'{"status":"ok"}'
    reused = conn.sock
    reused.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's head gets the same deadline
    for sock in (silent, slow, reused):
        assert _read_all(sock) == b""  # closed by the server, without an answer
        sock.close()


def test_a_body_that_does_not_arrive_is_a_408_in_each_format(limits_server):  # noqa: F811
    for path in ("/v1/completions", "/generate"):
        sock = _connect(limits_server)
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n".encode()
            + b'{"prompt": "'
        )
        head, _, body = _read_all(sock).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 408")
        if path.startswith("/v1/"):
            assert b'"code":"request_timeout"' in body and b'"type":"invalid_request_error"' in body
        else:
            assert b'"error_type":"validation"' in body


def test_connections_beyond_the_cap_get_503(server_model):  # noqa: F811
    srv = ServerThread(
        create_app(server_model, ServerSettings(model_name="capped", limit_concurrency=3), scheduler=_scheduler())
    )
    try:
        idle = [_connect(srv.url) for _ in range(2)]
        assert requests.get(f"{srv.url}/health", timeout=10).status_code == 503  # 3 connections with this one
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 30
        while requests.get(f"{srv.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        srv.stop()


# ---------------------------------------------------------------------- token limits
def _prompt(tokens: int) -> str:
    return "word " * tokens  # one token per word in SmolLM2's tokenizer (plus a few for the template)


def test_prompts_over_max_input_tokens_are_refused_in_each_format(limits_server):  # noqa: F811
    client = openai.OpenAI(base_url=f"{limits_server}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": _prompt(40)}], max_tokens=1)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert f"at most {LIMITS['max_input_tokens']} input tokens" in info.value.message
    with pytest.raises(text_generation.errors.ValidationError, match="input tokens"):
        text_generation.Client(limits_server, timeout=60).generate(_prompt(40), max_new_tokens=1)


def test_prompt_plus_reply_over_max_total_tokens_is_refused_and_the_default_fits(limits_server):  # noqa: F811
    client = openai.OpenAI(base_url=f"{limits_server}/v1", api_key="x", max_retries=0, timeout=60)
    prompt = _prompt(30)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="x", prompt=prompt, max_tokens=20)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    r = requests.post(f"{limits_server}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 20}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "max_new_tokens" in r.json()["error"]
    out = client.completions.create(model="x", prompt=prompt, temperature=0)  # no max_tokens: what fits
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= LIMITS["max_total_tokens"]
    info_body = requests.get(f"{limits_server}/info", timeout=10).json()
    assert (info_body["max_input_tokens"], info_body["max_total_tokens"]) == (32, 40)


def test_contradictory_token_limits_are_refused(server_model):  # noqa: F811
    with pytest.raises(ValueError, match="max_input_tokens"):
        ServerSettings(max_input_tokens=40, max_total_tokens=40)
    with pytest.raises(ValueError, match="context length"):
        create_app(server_model, ServerSettings(max_total_tokens=10_000), scheduler=_scheduler())


def _request(path: str, body: dict, extra: str = "") -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw


def _final(answer: bytes) -> tuple[bytes, bytes]:
    """The final answer's head and body, after any interim 1xx answers."""
    while answer.startswith(b"HTTP/1.1 1"):
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def test_a_request_whose_client_half_closes_is_answered(limits_server):  # noqa: F811
    # The client sends its whole request, then shuts its write side (EOF), and reads the answer.
    # Long enough a generation that the server sees the EOF before it answers.
    for path, body in (
        ("/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 6, "temperature": 0}),
        ("/generate", {"inputs": "Count: 1, 2, 3,", "parameters": {"max_new_tokens": 6}}),
    ):
        sock = _connect(limits_server)
        sock.sendall(_request(path, body))
        sock.shutdown(socket.SHUT_WR)
        head, answer = _final(_read_all(sock))  # the server closes after answering
        sock.close()
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"Transfer-Encoding: chunked" not in head and json.loads(answer), answer


def test_request_heads_are_capped_at_16_kib_and_100_headers(limits_server):  # noqa: F811
    body = {"prompt": "Hi", "max_tokens": 1}
    for extra, words in (
        (f"X-Big: {'a' * 20_000}\r\n", b"16 KiB"),
        ("".join(f"X-H{i}: v\r\n" for i in range(10_000)), b"more than 100 header lines"),
    ):
        sock = _connect(limits_server)
        sock.sendall(_request("/v1/completions", body, extra))
        head, answer = _final(_read_all(sock))
        sock.close()
        assert head.startswith(b"HTTP/1.1 431") and words in answer, (head, answer[:200])
        assert json.loads(answer)["error"]["code"] == "request_header_fields_too_large"
    fits = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(90))  # 90 headers, ~10 KB: answered
    sock = _connect(limits_server)
    sock.sendall(_request("/v1/completions", body, fits + "Connection: close\r\n"))
    head, _ = _final(_read_all(sock))
    sock.close()
    assert head.startswith(b"HTTP/1.1 200"), head


def test_head_health(limits_server):  # noqa: F811
    r = requests.head(f"{limits_server}/health", timeout=10)
    assert r.status_code == 200 and r.content == b""
