"""GET /metrics: Prometheus text with requests, tokens, tok/s, hit rate, bytes streamed, stall, memory."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import chat_body, metric, server  # noqa: F401

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
