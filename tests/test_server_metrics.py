"""GET /metrics: Prometheus text with requests, tokens, tok/s, hit rate, bytes streamed, stall, memory;
label values from a closed set, and clients that leave counted as 499."""

from __future__ import annotations

import random
import socket
import string
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import API_KEY, chat_body, keyed_server, metric, server  # noqa: F401

pytestmark = pytest.mark.slow


def test_metrics_count_requests_tokens_and_the_engine(server):  # noqa: F811
    before = {
        name: metric(server, name) for name in ("torus_generated_tokens_total", "torus_engine_streamed_bytes_total")
    }
    requests_before = metric(server, "torus_http_requests_total", route="/v1/chat/completions", status="200")
    r = requests.post(f"{server}/v1/chat/completions", json=chat_body("Hi", 3), timeout=60)
    assert r.status_code == 200

    page = requests.get(f"{server}/metrics", timeout=10)
    assert page.headers["content-type"].startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(page.text) for s in f.samples}
    for name in (
        "torus_http_requests_total",
        "torus_requests_finished_total",
        "torus_prompt_tokens_total",
        "torus_generated_tokens_total",
        "torus_generated_tokens_per_second",
        "torus_engine_hit_rate",
        "torus_engine_streamed_bytes_total",
        "torus_engine_stall_seconds_total",
        "torus_engine_peak_device_bytes",
    ):
        assert name in names, name
    assert (
        metric(server, "torus_http_requests_total", route="/v1/chat/completions", status="200") == requests_before + 1
    )
    tokens = r.json()["usage"]["completion_tokens"]
    assert metric(server, "torus_generated_tokens_total") - before["torus_generated_tokens_total"] == tokens
    # 4 FFN layers stream through the copy ring on every forward pass
    assert metric(server, "torus_engine_streamed_bytes_total") > before["torus_engine_streamed_bytes_total"]
    assert 0.0 <= metric(server, "torus_engine_hit_rate") <= 1.0
    assert metric(server, "torus_engine_peak_device_bytes") > 0
    assert metric(server, "torus_engine_streamed_layers") == 4


def test_label_values_stay_in_a_closed_set_whatever_clients_send(keyed_server):  # noqa: F811
    # 200 unauthenticated requests, each with its own made-up method and path: they are counted
    # (as method "other", route "other", status 401), but they add no new series.
    rng = random.Random(0)
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def series() -> set[tuple[str, ...]]:
        text = requests.get(f"{keyed_server}/metrics", headers=auth, timeout=10).text
        return {
            tuple(sorted(s.labels.items()))
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("torus_http_")
        }

    requests.request("BREW", f"{keyed_server}/coffee", timeout=10)  # the "other" series exist from here on
    series()  # ... and those of /metrics itself
    before = series()
    for _ in range(200):
        method = "".join(rng.choices(string.ascii_uppercase, k=60))
        path = "/" + "".join(rng.choices(string.ascii_lowercase, k=30))
        assert requests.request(method, f"{keyed_server}{path}", timeout=10).status_code == 401
    after = series()
    assert after == before
    methods = {dict(labels).get("method") for labels in after} - {None}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


def test_a_client_that_leaves_mid_body_counts_as_499_not_500(server):  # noqa: F811
    labels = dict(route="other", method="POST")
    closed, failed = (metric(server, "torus_http_requests_total", status=s, **labels) for s in ("499", "500"))
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"messages": ['
        )
    deadline = time.monotonic() + 30
    while metric(server, "torus_http_requests_total", status="499", **labels) == closed:
        assert time.monotonic() < deadline, "the abandoned request was not counted"
        time.sleep(0.05)
    assert metric(server, "torus_http_requests_total", status="500", **labels) == failed
