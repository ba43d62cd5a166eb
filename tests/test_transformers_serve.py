"""The plugin inside an existing framework: `transformers serve`, started with streaming enabled,
answers the official `openai` client, and the engine's counters prove the FFNs were streamed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torus_adapters.apps.cli",
        "transformers-serve",
        "--transport",
        "copy",
        "--resident-layers",
        "10",
        "--",
        smollm2_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited: {proc.stdout.read()[-3000:]}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("transformers serve did not come up within 120 s")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def stats(base: str) -> dict:
    return json.loads(urllib.request.urlopen(base + "/torus/stats", timeout=5).read())


def test_openai_client_gets_an_answer_from_streamed_ffns(server, smollm2_path):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    before = stats(server)["engines"]
    assert len(before) == 1 and before[0]["stats"]["streamed_layers"] == 20
    reply = client.chat.completions.create(
        model=smollm2_path,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
    )
    assert "Paris" in reply.choices[0].message.content
    after = stats(server)["engines"][0]["stats"]
    # Every decode step streamed the 20 non-resident FFN layers through the ring.
    assert after["bytes_moved"] > before[0]["stats"]["bytes_moved"]
    assert after["hits"] >= 20 * 2 and after["misses"] == 0 and after["resident_layers"] == 10
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=smollm2_path,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            stream=True,
        )
        if chunk.choices
    )
    assert "Paris" in streamed


def test_several_api_servers_are_refused_in_one_line(smollm2_path):
    """Extra API servers are spawned apps without the stats route: refused before anything loads."""
    out = subprocess.run(
        [sys.executable, "-m", "torus_adapters.apps.cli", "transformers-serve", "--", smollm2_path]
        + ["--api-server-count", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr == (
        "torus-sparse: error: torus-sparse transformers-serve runs one API server (got --api-server-count 2): "
        "drop the flag, or use `torus-sparse serve`, which batches requests itself\n"
    )
