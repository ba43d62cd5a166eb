"""`torus-sparse serve` end to end: the real command in a subprocess, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import text_generation

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TORUS_SPARSE_API_KEY"}
    cmd = [sys.executable, "-m", "torus_adapters.apps.cli", "serve", "--log-level", "warning", *args]
    return subprocess.Popen(
        cmd, env={**env, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until_up(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def _running(base: str, key: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return next(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "torus_requests_running"
    )


NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: these replies cannot end before max_tokens
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy SmolLM2 keeps counting (TGI has no logit_bias)


def test_serve_with_a_key_file_then_sigterm_with_generations_in_flight(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(
        "--port", str(port), "--api-key-file", str(key_file), "--served-model-name", "smol",
        "--shutdown-timeout", "5", "--header-timeout", "1",
    )  # fmt: skip
    try:
        _wait_until_up(proc, base)
        auth = {"Authorization": "Bearer k3y"}
        assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"{base}/v1/models", headers=auth, timeout=10).json()["data"][0]["id"] == "smol"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as half_open:
            half_open.sendall(b"GET /health HTTP/1.1\r\n")
            assert half_open.recv(1024) == b""  # --header-timeout closed it

        oa = openai.OpenAI(base_url=f"{base}/v1", api_key="k3y", max_retries=0, timeout=120)
        tgi = text_generation.Client(base, headers=auth, timeout=120)
        chat = dict(model="x", messages=[{"role": "user", "content": "Tell me a story."}], logit_bias=NO_EOS)
        with ThreadPoolExecutor(5) as pool:
            long_calls = {
                "openai stream": pool.submit(
                    lambda: list(oa.chat.completions.create(**chat, max_tokens=2000, stream=True))
                ),
                "openai plain": pool.submit(lambda: oa.chat.completions.create(**chat, max_tokens=2000)),
                "tgi stream": pool.submit(lambda: list(tgi.generate_stream(COUNTING, max_new_tokens=2000))),
                "tgi plain": pool.submit(lambda: tgi.generate(COUNTING, max_new_tokens=2000)),
            }
            deadline = time.monotonic() + 60
            while _running(base, "k3y") < 4:
                assert time.monotonic() < deadline, "the long generations did not start"
                time.sleep(0.1)
            short = oa.chat.completions.create(**chat, max_tokens=4, stream=True)
            first = next(iter(short))  # accepted: the stream has begun
            proc.send_signal(signal.SIGTERM)

            # a generation that can finish within --shutdown-timeout does, normally
            rest = list(short)
            assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason == "length"
            # the others end with an error in their client's format once the grace is over
            errors = {}
            for name, call in long_calls.items():
                with pytest.raises(Exception) as info:
                    call.result(timeout=120)
                errors[name] = info.value
        assert (
            isinstance(errors["openai stream"], openai.APIError) and "shutting down" in errors["openai stream"].message
        )
        assert isinstance(errors["openai plain"], openai.InternalServerError)
        assert (
            errors["openai plain"].status_code == 503 and errors["openai plain"].body["code"] == "server_shutting_down"
        )
        assert isinstance(errors["tgi stream"], text_generation.errors.OverloadedError)
        assert isinstance(errors["tgi plain"], text_generation.errors.OverloadedError)
        with pytest.raises(requests.ConnectionError):  # no longer accepting
            requests.get(f"{base}/health", timeout=5)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGTERM  # after its shutdown, uvicorn re-raises the signal it handled
    assert "Traceback" not in err and "ending 4 generation(s) still running" in err, err


def test_serve_rejects_bad_settings_before_loading():
    for args, words in ((("--max-batch-size", "0"), "max_batch_size"), (("--api-key", ""), "empty or blank")):
        proc = _serve(*args)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and words in err, err


def test_a_second_ctrl_c_ends_the_grace_with_typed_errors_and_a_clean_exit():
    """Ctrl+C starts the drain (a 60 s grace here); a second Ctrl+C ends it at once: every
    generation still running gets its client's typed error, the process exits without an abort
    or a traceback (uvicorn's forced exit used to cut streams and abort the process)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve("--port", str(port), "--shutdown-timeout", "60")
    try:
        _wait_until_up(proc, base)
        oa = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        tgi = text_generation.Client(base, timeout=120)
        chat = dict(model="x", messages=[{"role": "user", "content": "Tell me a story."}], logit_bias=NO_EOS)
        with ThreadPoolExecutor(3) as pool:
            calls = {
                "openai stream": pool.submit(
                    lambda: list(oa.chat.completions.create(**chat, max_tokens=4000, stream=True))
                ),
                "openai plain": pool.submit(lambda: oa.chat.completions.create(**chat, max_tokens=4000)),
                "tgi plain": pool.submit(lambda: tgi.generate(COUNTING, max_new_tokens=4000)),
            }
            deadline = time.monotonic() + 60
            while _running(base, "") < 3:
                assert time.monotonic() < deadline, "the generations did not start"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert all(not c.done() for c in calls.values())  # the grace is running
            second = time.monotonic()
            proc.send_signal(signal.SIGINT)
            errors = {}
            for name, call in calls.items():
                with pytest.raises(Exception) as info:
                    call.result(timeout=60)
                errors[name] = info.value
            assert time.monotonic() - second < 20  # not the 60 s grace
        stream_error, plain_error = errors["openai stream"], errors["openai plain"]
        assert isinstance(stream_error, openai.APIError) and "shutting down" in stream_error.message
        assert isinstance(plain_error, openai.InternalServerError) and plain_error.status_code == 503
        assert isinstance(errors["tgi plain"], text_generation.errors.OverloadedError)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 1, -signal.SIGINT, 130), (proc.returncode, err)
    assert "terminate called" not in err and "Traceback" not in err, err
    assert "now (second interrupt)" in err, err
