"""`GET /metrics` in Prometheus format: requests, tokens, tok/s, and the engine's own counters.

Each app has its own registry (several apps can live in one process, as in the tests). Scheduler
counters and engine stats are read when Prometheus scrapes, never on the token path.

Every label value comes from a closed set, whatever clients send: the route template a router
matched (else "other"), a standard method (else "other"), and the status the server answered. A
request whose client left before any answer counts as 499 ("client closed request", nginx's
code), not as a 500.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .generation import CANCELLED, EOS, ERROR, LENGTH, STOP

CONTENT_TYPE = CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED = 499


class _ModelCollector:
    """Scheduler counters and `EngineStats`, read at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        c = self.service.scheduler.counters
        finished = CounterMetricFamily(
            "torus_requests_finished", "Generation requests that ended, by reason", labels=["reason"]
        )
        for reason in (EOS, LENGTH, STOP, CANCELLED, ERROR):
            finished.add_metric([reason], c.finished.get(reason, 0))
        yield finished
        yield GaugeMetricFamily("torus_requests_running", "Requests in the decode batch", value=c.running)
        yield GaugeMetricFamily("torus_requests_waiting", "Requests waiting for a batch slot", value=c.waiting)
        yield GaugeMetricFamily("torus_batch_size", "Rows in the latest decode step", value=c.batch_size)
        yield CounterMetricFamily("torus_prompt_tokens", "Prompt tokens prefilled", value=c.prompt_tokens)
        yield CounterMetricFamily("torus_generated_tokens", "Tokens generated", value=c.generated_tokens)
        yield GaugeMetricFamily(
            "torus_generated_tokens_per_second",
            "Tokens generated per second over the last 10 s",
            value=c.tokens_per_second(),
        )
        yield CounterMetricFamily("torus_prefills", "Prompts prefilled", value=c.prefills)
        yield CounterMetricFamily(
            "torus_prefill_chunks", "Prefill forward passes (a long prompt takes several)", value=c.prefill_chunks
        )
        yield CounterMetricFamily("torus_decode_steps", "Batched decode forward passes", value=c.decode_steps)
        yield from self._engine()

    def _engine(self) -> Iterable[Metric]:
        s = self.service.tm.stats()
        yield CounterMetricFamily("torus_engine_hits", "Streamed FFN layers found ready (prefetched)", value=s.hits)
        yield CounterMetricFamily("torus_engine_misses", "Streamed FFN layers loaded synchronously", value=s.misses)
        yield GaugeMetricFamily("torus_engine_hit_rate", "hits / (hits + misses)", value=s.hit_rate)
        yield CounterMetricFamily(
            "torus_engine_streamed_bytes", "Host-to-device bytes copied for FFN weights", value=s.bytes_moved
        )
        yield CounterMetricFamily("torus_engine_stall_seconds", "Time compute waited for FFN weights", value=s.stall_s)
        yield CounterMetricFamily(
            "torus_engine_forward_passes", "Passes through the streamed layers", value=s.forward_passes
        )
        yield GaugeMetricFamily(
            "torus_engine_resident_layers", "FFN layers kept on the device", value=s.resident_layers
        )
        yield GaugeMetricFamily(
            "torus_engine_streamed_layers", "FFN layers streamed each pass", value=s.streamed_layers
        )
        yield GaugeMetricFamily(
            "torus_engine_resident_bytes", "Device bytes held for resident FFN layers", value=s.resident_bytes
        )
        yield GaugeMetricFamily(
            "torus_engine_peak_device_bytes",
            "Peak device memory (CUDA: allocator peak; CPU: engine placement)",
            value=s.peak_device_bytes,
        )
        device = torch.device(self.service.scheduler.device)
        if device.type == "cuda":
            yield GaugeMetricFamily(
                "torus_device_memory_allocated_bytes",
                "Device memory allocated now",
                value=torch.cuda.memory_allocated(device),
            )


class ServerMetrics:
    """The app's registry: HTTP counters (filled by `HttpMetricsMiddleware`) and the model collector."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "torus_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.http_seconds = Histogram(
            "torus_http_request_duration_seconds",
            "Time to answer (streams: until the last event)",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(_ModelCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """Counts answers by route template, method and status (each from a closed set)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        client_left = False
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def watch_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        raised = True
        try:
            await self.app(scope, watch_receive, send_status)
            raised = False
        finally:
            if status is None:  # nothing was answered: the client left, or the app failed
                status = CLIENT_CLOSED if client_left and not raised else 500
            route = getattr(scope.get("route"), "path", None) or "other"  # set by the router that matched
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - start)
