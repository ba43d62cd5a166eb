"""Fixtures for the server tests: the real SmolLM2 behind real servers on 127.0.0.1.

The model and its scheduler are loaded once per process and shared by every app (several test
modules import these fixtures; the objects behind them are cached here, so nothing loads twice).
Servers run `torus-sparse serve`'s uvicorn server in a daemon thread on an ephemeral port. Where
the answers' content does not matter, `tiny_model()` (a random-init two-layer Llama with
SmolLM2's tokenizer, streamed through the copy ring) keeps a test independent of the shared one.
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
LIMITS = {"max_input_tokens": 32, "max_total_tokens": 40}


@functools.lru_cache(maxsize=None)
def _model() -> Any:
    from torus_plugins import TorusConfig, TorusModel

    return TorusModel.from_pretrained(None, TorusConfig(**STREAM_CONFIG), show_progress=False)


@functools.lru_cache(maxsize=None)
def tiny_model() -> Any:
    import torch
    import transformers as T

    from torus_adapters.transformers_adapter.default_model import default_model_path
    from torus_plugins import TorusConfig, TorusModel, attach

    tokenizer = T.AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = T.AutoModelForCausalLM.from_config(config).eval()
    attach(model, TorusConfig(transport="copy", resident_layers=0))
    return TorusModel(model, tokenizer)


@functools.lru_cache(maxsize=None)
def _scheduler() -> Any:
    from torus_adapters.server import Scheduler

    return Scheduler.for_model(_model(), max_batch_size=8, max_pending=16)


class ServerThread:
    """`torus-sparse serve`'s uvicorn server (limits, drain) for `app` on 127.0.0.1:<free port>, in a
    daemon thread."""

    def __init__(self, app: Any) -> None:
        from torus_adapters.server.run import make_server

        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, log_level="warning")
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
    from torus_adapters.server.hosts import allowed_hosts_for

    loopback = allowed_hosts_for("127.0.0.1")  # what `serve` answers on 127.0.0.1
    settings = {
        "main": ServerSettings(model_name="smollm2-test", max_body_bytes=64 * 1024, allowed_hosts=loopback),
        "keyed": ServerSettings(model_name="smollm2-test", api_key=API_KEY, allowed_hosts=loopback, docs=True),
        # schemathesis: tiny generations, so hundreds of generated requests stay cheap
        "fuzz": ServerSettings(model_name="smollm2-test", max_tokens_limit=2, default_max_tokens=2, docs=True),
        # small token limits, short connection deadlines, extra Host names
        "limits": ServerSettings(
            model_name="smollm2-test",
            max_input_tokens=LIMITS["max_input_tokens"],
            max_total_tokens=LIMITS["max_total_tokens"],
            header_timeout=0.5,
            body_timeout=0.5,
            allowed_hosts=allowed_hosts_for("127.0.0.1", ("myhost.example", "*.corp.example")),
        ),
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


@pytest.fixture(scope="session")
def limits_server() -> str:
    """No key; prompts of at most 32 tokens, 40 in all; 0.5 s for a request head or body; also
    answers Host myhost.example and *.corp.example."""
    return _server("limits").url


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
