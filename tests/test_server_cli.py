"""`torus-sparse serve` end to end: the real command in a subprocess, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORUS_SPARSE_API_KEY": ""}
    cmd = [sys.executable, "-m", "torus_adapters.cli", "serve", "--log-level", "warning", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_command_answers_with_its_key_and_stops_on_ctrl_c():
    port = _free_port()
    proc = _serve("--port", str(port), "--api-key", "k3y", "--served-model-name", "smol", "--max-tokens-limit", "4")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
        r = requests.post(
            f"{base}/v1/completions",
            json={"model": "smol", "prompt": "Hello", "max_tokens": 2},
            headers={"Authorization": "Bearer k3y"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["model"] == "smol"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def test_serve_rejects_bad_settings_before_loading():
    proc = _serve("--max-batch-size", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "max_batch_size" in err
