"""Fixtures for the server tests: the real SmolLM2 behind real servers on 127.0.0.1.

The model and its scheduler are loaded once per process and shared by every app (several test
modules import these fixtures; the objects behind them are cached here, so nothing loads twice).
Servers run uvicorn in a daemon thread on an ephemeral port.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Any

import pytest
import requests

# Four streamed FFN layers: the engine's copy ring runs (so /metrics shows bytes streamed) while
# most layers stay resident, which keeps the CPU tests quick.
STREAM_CONFIG = dict(transport="copy", resident_layers=26, lookahead=2)
API_KEY = "test-key-123"


@functools.lru_cache(maxsize=None)
def _model() -> Any:
    from torus_plugins import TorusConfig, TorusModel

    return TorusModel.from_pretrained(None, TorusConfig(**STREAM_CONFIG), show_progress=False)


@functools.lru_cache(maxsize=None)
def _scheduler() -> Any:
    from torus_adapters.server import Scheduler

    return Scheduler.for_model(_model(), max_batch_size=8, max_pending=16)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@functools.lru_cache(maxsize=None)
def _server(kind: str) -> ServerThread:
    from torus_adapters.server import ServerSettings, create_app

    settings = {
        "main": ServerSettings(model_name="smollm2-test", max_body_bytes=64 * 1024),
        "keyed": ServerSettings(model_name="smollm2-test", api_key=API_KEY),
        # schemathesis: tiny generations, so hundreds of generated requests stay cheap
        "fuzz": ServerSettings(model_name="smollm2-test", max_tokens_limit=2, default_max_tokens=2),
    }[kind]
    return ServerThread(create_app(_model(), settings, scheduler=_scheduler()))


@pytest.fixture(scope="session")
def server_model() -> Any:
    return _model()


@pytest.fixture(scope="session")
def server() -> str:
    """Base URL of the main test server (no API key, 64 KiB body limit)."""
    return _server("main").url


@pytest.fixture(scope="session")
def keyed_server() -> str:
    return _server("keyed").url


@pytest.fixture(scope="session")
def fuzz_server() -> str:
    return _server("fuzz").url


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let `huggingface_hub` clients talk to 127.0.0.1 although the suite sets HF_HUB_OFFLINE=1.

    Offline mode blocks every request, even to a local server. Turning it off is safe here because
    telemetry (which would fetch the agent registry from the Hub while building headers) is off and
    the Hub endpoint points at a closed local port: any stray Hub request fails at once, locally.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


def metric(base: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` on the server's /metrics whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def chat_body(content: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": "any",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
