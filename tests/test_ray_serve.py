"""`torus-sparse serve --ray --replicas 2` on a real local Ray cluster, loopback only.

One cluster for the module: the real command in a child process (it starts the cluster, 2 CPUs
here, and runs two CPU replicas of the embedded model behind Ray's HTTP proxy, with an API key).
The same greedy requests go to it and to the plain server of `server_fixtures` (same model, same
streaming config, same key): the replies are equal. Then concurrency, a replica killed mid-stream,
and SIGTERM. Everything else about replicas (health, re-attach, the proxy's stream guard, wrong
flags) is tested in process, in `test_server_replica.py` and at the end of this file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'torus-sparse[ray]')")

import openai  # noqa: E402
import requests  # noqa: E402
from server_fixtures import API_KEY, STREAM_CONFIG, _server  # noqa: E402

from torus_adapters.apps.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_S = 240  # a cold cluster and two model loads on two busy cores
TOOLS = [
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
    }
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The `torus-sparse serve --ray` child process and its URL."""

    def __init__(self, tmp: Any) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "serve-ray.log", "w+")
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in STREAM_CONFIG.items()]
        cmd = [sys.executable, "-m", "torus_adapters.apps.cli", "serve", "--ray", "--replicas", "2"]
        cmd += ["--port", str(self.port), "--api-key", API_KEY, "--served-model-name", "smollm2-test", *flags]
        cmd += ["--log-level", "warning", "--shutdown-timeout", "5"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve --ray exited {self.proc.returncode}:\n{self.output()}"
            try:
                if requests.get(f"{self.url}/v1/models", headers=AUTH, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"serve --ray did not answer within {START_S} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def stats(self, replica: str | None = None, timeout: float = 60) -> dict[str, Any]:
        """`/torus/stats` of `replica` (any when None): asked until that replica answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(f"{self.url}/torus/stats", headers=AUTH, timeout=10)
            if r.status_code == 200 and replica in (None, r.json()["replica"]):
                assert r.headers["x-torus-replica"] == r.json()["replica"]
                return r.json()
            time.sleep(0.05)
        pytest.fail(f"replica {replica} did not answer /torus/stats within {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        plain()  # the plain server loads its model while the cluster starts
        c.wait_ready()
        yield c
    finally:
        c.stop()
        c.log.close()


def plain() -> str:
    return _server("keyed").url  # the plain server: same model, streaming config and key


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(url: str) -> str:
    reply = client(url).chat.completions.create(model="x", messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.model == "smollm2-test"
    return reply.choices[0].message.content


def _stream(url: str) -> str:
    stream = client(url).chat.completions.create(
        model="x", messages=QUESTION, max_tokens=12, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _tool_call(url: str) -> tuple[str, dict]:
    reply = client(url).chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Add 40 and 2."}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    call = reply.choices[0].message.tool_calls[0]
    return call.function.name, json.loads(call.function.arguments)


@pytest.mark.parametrize("ask", [_chat, _stream, _tool_call], ids=["chat", "stream", "tool_call"])
def test_replies_through_rays_proxy_equal_the_plain_servers(cluster, ask):
    assert ask(cluster.url) == ask(plain())


def test_the_api_key_is_enforced_through_the_proxy(cluster):
    assert requests.get(f"{cluster.url}/health", timeout=10).status_code == 200  # never needs the key
    bare = requests.post(f"{cluster.url}/v1/chat/completions", json={"messages": QUESTION}, timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert requests.get(f"{cluster.url}/torus/stats", timeout=10).status_code == 401


def test_concurrent_requests_spread_over_both_replicas(cluster):
    ids = {cluster.stats()["replica"] for _ in range(40)}
    assert len(ids) == 2, ids
    before = {rid: sum(cluster.stats(rid)["requests"]["finished"].values()) for rid in ids}

    def ask(i: int) -> str:
        body = {"model": "x", "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 6}
        r = requests.post(f"{cluster.url}/v1/chat/completions", json={**body, "temperature": 0}, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.headers["x-torus-replica"]

    with ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(ask, range(16)))
    by_header = {rid: answered.count(rid) for rid in ids}
    assert all(by_header.values()), by_header  # both replicas answered some
    done = {rid: sum(cluster.stats(rid)["requests"]["finished"].values()) - before[rid] for rid in ids}
    assert done == by_header  # each replica's own counters agree with the answers' headers


def test_a_replica_killed_mid_stream_ends_its_stream_typed_and_is_replaced(cluster):
    # each replica's process, asked while both are idle (a busy replica is not picked for a GET)
    pids: dict[str, int] = {}
    while len(pids) < 2:
        stats = cluster.stats()
        pids[stats["replica"]] = stats["pid"]
    stream = client(cluster.url).chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400, stream=True
    )
    victim = stream.response.headers["x-torus-replica"]
    chunks = iter(stream)
    next(chunks)
    os.kill(pids[victim], signal.SIGKILL)  # what an out-of-memory kill does to a replica
    with pytest.raises(openai.APIError) as err:
        for _ in chunks:
            pass
    assert victim in err.value.message and getattr(err.value, "code", None) == "replica_failed"
    # the other replica keeps serving meanwhile
    for _ in range(3):
        r = requests.post(
            f"{cluster.url}/v1/chat/completions",
            json={"model": "x", "messages": QUESTION, "max_tokens": 4, "temperature": 0},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 200 and r.headers["x-torus-replica"] != victim
    # and Ray starts a replacement: a third id answers
    deadline = time.monotonic() + 180
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen.add(cluster.stats()["replica"])
        if len(seen - {victim}) == 2:
            break
        time.sleep(0.2)
    assert len(seen - {victim}) == 2, seen


def test_sigterm_stops_the_replicas_and_the_cluster(cluster):
    assert cluster.stop() == 0, cluster.output()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{cluster.url}/health", timeout=5)


# ---------------------------------------------------------------------- wrong flags: one line, exit 2
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "2"], "--replicas needs --ray (replicas on Ray Serve)"),
        (["--ray-address", "auto"], "--ray-address needs --ray (replicas on Ray Serve)"),
        (["--ray", "--replicas", "0"], "--replicas takes a whole number of replicas, at least 1; got '0'"),
        (["--ray", "--replicas", "two"], "--replicas takes a whole number of replicas, at least 1; got 'two'"),
        (
            ["--ray", "--autoscale", "3:1"],
            "--autoscale takes MIN:MAX replicas, whole numbers with MIN <= MAX and MAX at least 1 (e.g. 1:4); "
            "got '3:1'",
        ),
        (
            ["--ray", "--autoscale", "4"],
            "--autoscale takes MIN:MAX replicas, whole numbers with MIN <= MAX and MAX at least 1 (e.g. 1:4); got '4'",
        ),
        (
            ["--ray", "--replicas", "2", "--autoscale", "1:2"],
            "--replicas and --autoscale are exclusive: a fixed count or a range",
        ),
        (
            ["--ray", "--replica-cpus", "-1"],
            "--replica-cpus takes a number of CPUs, 0 or more (fractions share one); got '-1'",
        ),
        (
            ["--ray", "--replica-gpus", "nan"],
            "--replica-gpus takes a number of GPUs, 0 or more (fractions share one); got 'nan'",
        ),
    ],
)
def test_wrong_ray_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err == f"torus-sparse: error: {message}\n"


def test_an_address_nothing_answers_is_one_line_not_minutes(capsys):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--ray", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torus-sparse: error: --ray-address 127.0.0.1:{port}: nothing answers there (")
    assert err.endswith("or leave --ray-address out to start a local one\n")


# ---------------------------------------------------------------------- the proxy's stream guard, in process
def _guarded(path: str, app) -> list[dict]:
    from torus_adapters.ray_serve.proxy import StreamEndGuard

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    import asyncio

    asyncio.run(StreamEndGuard(app)({"type": "http", "path": path, "method": "POST"}, receive, send))
    return sent


def _stream_then(fail: bool):
    async def app(scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-torus-replica", b"abc123")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        if fail:
            raise RuntimeError("ActorDiedError")  # what Ray's proxy meets when the replica dies

    return app


@pytest.mark.parametrize("fail", [True, False], ids=["raised", "returned"])
def test_a_cut_stream_ends_with_the_servers_error_event(fail):
    from torus_adapters.server.errors import openai_body, tgi_body

    message = "replica abc123 serving this stream stopped before it finished; send the request again"
    last = _guarded("/v1/chat/completions", _stream_then(fail))[-1]
    assert last["more_body"] is False
    error, done = last["body"].decode().split("\n\n")[:2]
    assert json.loads(error.removeprefix("data: ")) == openai_body(502, message, None, "replica_failed")
    assert done == "data: [DONE]"
    last = _guarded("/generate_stream", _stream_then(fail))[-1]
    assert json.loads(last["body"].decode().removeprefix("data:")) == tgi_body(message, "generation")


def test_finished_streams_and_plain_answers_pass_untouched():
    async def whole(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    assert [m.get("body") for m in _guarded("/v1/completions", whole)] == [None, b"data: [DONE]\n\n"]

    async def broken(scope, receive, send) -> None:
        raise RuntimeError("before any answer")  # not the proxy's way: passed on to uvicorn

    with pytest.raises(RuntimeError):
        _guarded("/v1/models", broken)

    async def replica_json(scope, receive, send) -> None:  # a replica's own error is its own
        headers = [(b"content-type", b"application/json"), (b"x-torus-replica", b"abc123")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error":{}}', "more_body": False})

    assert _guarded("/v1/models", replica_json)[-1]["body"] == b'{"error":{}}'


def test_the_proxys_own_errors_get_the_routes_error_format():
    from torus_adapters.ray_serve.proxy import PROXY_ERRORS
    from torus_adapters.server.errors import openai_body, tgi_body

    async def nothing(scope, receive, send) -> None:  # what Ray's proxy does when the replica died
        return None

    start, body = _guarded("/v1/chat/completions", nothing)
    assert start["status"] == 500
    assert json.loads(body["body"]) == openai_body(500, PROXY_ERRORS[500], None, "replica_failed")

    async def unavailable(scope, receive, send) -> None:  # no replica can take it: Ray's plain 503
        headers = [(b"content-type", b"text/plain"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"Deployment unavailable", "more_body": False})

    start, body = _guarded("/generate", unavailable)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"]) == tgi_body(PROXY_ERRORS[503], "overloaded")


# ---------------------------------------------------------------------- metrics into Ray's, the config-file builder
def test_each_replicas_metrics_are_copied_into_gauges_with_their_labels():
    from prometheus_client import CollectorRegistry, Counter

    from torus_adapters.ray_serve.deployment import MetricsMirror

    registry = CollectorRegistry()
    Counter("torus_http_requests", "HTTP requests answered", ["route"], registry=registry).labels("/v1/models").inc(3)
    Counter("other_total", "not ours", registry=registry).inc()
    made: dict[str, Any] = {}

    class Gauge:
        def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
            self.name, self.description, self.tag_keys, self.values = name, description, tag_keys, {}
            made[name] = self

        def set(self, value: float, tags: dict | None = None) -> None:
            self.values[tuple(sorted((tags or {}).items()))] = value

    assert MetricsMirror(registry, Gauge).update() == 1
    (gauge,) = made.values()
    assert (gauge.name, gauge.description, gauge.tag_keys) == (
        "torus_replica_http_requests_total",
        "HTTP requests answered",
        ("route",),
    )
    assert gauge.values == {(("route", "/v1/models"),): 3.0}


def test_the_config_file_builder_takes_model_torus_and_server(monkeypatch):
    from torus_adapters.ray_serve.deployment import app_builder
    from torus_plugins import ConfigError

    monkeypatch.setenv("TORUS_SPARSE_API_KEY", "from-env")
    app = app_builder({"torus": {"lookahead": 3}, "server": {"model_name": "m", "allowed_hosts": ["a.example"]}})
    model, config, settings = app._bound_deployment.init_args
    assert model is None and config.lookahead == 3
    assert (settings.model_name, settings.api_key, settings.allowed_hosts) == ("m", "from-env", ("a.example",))
    with pytest.raises(ConfigError, match="unknown argument"):
        app_builder({"replicas": 2})
    with pytest.raises(ConfigError, match="unknown TorusConfig field"):
        app_builder({"torus": {"budget": "6GB"}})
