"""The Gradio demo end to end: `gradio_app.py` started the way the README starts it, on an
ephemeral port, with the real embedded model; driven by `gradio_client` and by Debian's
headless Chromium through Playwright. The screenshot lands in the test artifacts folder
(`test-artifacts/`, or $TORUS_TEST_ARTIFACTS)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
QUESTION = "What is the capital of France?"
STARTUP_LIMIT_S = 180  # a bail-out for a server that never comes up, not a performance bound


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("TORUS_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(artifacts: Path) -> Iterator[str]:
    """`python gradio_app.py --port N`, as a user runs it; its output goes to gradio_app.log."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log_path = artifacts / "gradio_app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "gradio_app.py", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gradio_app.py exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gradio_app.py did not answer on {url}:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(app_url: str):
    from gradio_client import Client

    return Client(app_url, analytics_enabled=False, verbose=False)


def _reply_text(history: list[dict[str, Any]]) -> str:
    """The last assistant message's text, from the Chatbot value the API returns."""
    for m in reversed(history):
        if m["role"] == "assistant":
            content = m["content"]
            if isinstance(content, str):
                return content
            return "".join(part.get("text") or "" for part in content)
    return ""


@pytest.fixture(scope="module")
def france_chat(client) -> list[tuple]:
    """Every update the `/chat` endpoint streamed for the France question."""
    job = client.submit(QUESTION, [], 24, api_name="/chat")
    list(job)  # drain the stream
    return job.outputs()


def test_chat_streams_reply(france_chat: list[tuple]) -> None:
    texts = [_reply_text(out[1]) for out in france_chat]
    final = texts[-1]
    assert "Paris" in final
    growing = [t for t in texts if t]
    assert len(set(growing)) > 1, f"the reply arrived in one piece: {texts}"
    assert all(final.startswith(t) for t in growing)  # each update extends the previous text


def test_stats_show_streamed_bytes(client, france_chat: list[tuple]) -> None:
    live = france_chat[-1][3]  # the stats the chat stream ended with
    assert live["reply"]["tokens"] > 0 and live["reply"]["bytes_streamed"] > 0
    panel, data = client.predict(api_name="/stats")
    engine = data["engine"]
    assert engine["transport"] == ("cuda" if torch.cuda.is_available() else "copy")  # the demo's default
    assert engine["streamed_layers"] > 0 and engine["resident_layers"] > 0
    assert engine["bytes_moved"] > 0 and engine["streamed_bytes_per_pass"] > 0
    assert data["reply"]["bytes_streamed"] > 0
    assert "streamed from host RAM" in panel and "hit rate" in panel
    # "since attach" counts the finished replies' tokens and their decode speed (it was blank)
    assert engine["tokens_since_attach"] >= data["reply"]["tokens"] > 0
    assert engine["decode_tok_s_since_attach"] > 0
    tokens_row = next(line for line in panel.splitlines() if line.startswith("| tokens |"))
    assert tokens_row.rstrip(" |").split("|")[-1].strip() == str(engine["tokens_since_attach"])
    speed_row = next(line for line in panel.splitlines() if line.startswith("| decode speed |"))
    assert speed_row.rstrip(" |").split("|")[-1].strip().endswith("tok/s")


def test_reload_with_new_lookahead(client, france_chat: list[tuple]) -> None:
    from gradio_client.exceptions import AppError

    _, before = client.predict(api_name="/stats")
    budget_mib, transport = before["engine"]["vram_budget"] / 2**20, before["engine"]["transport"]
    status, _, after = client.predict(budget_mib, before["engine"]["lookahead"] + 1, transport, api_name="/reload")
    assert after["engine"]["lookahead"] == before["engine"]["lookahead"] + 1
    assert f"lookahead {after['engine']['lookahead']}" in status

    # The smallest budget offered holds a ring for the configured lookahead (2), not 8: the error reaches the client
    # and the previous engine stays attached.
    smallest = math.ceil(before["engine"]["vram_budget_range"]["minimum"] / 2**20)
    with pytest.raises(AppError, match="too small"):
        client.predict(smallest, 8, transport, api_name="/reload")
    _, kept = client.predict(api_name="/stats")
    assert kept["engine"]["lookahead"] == after["engine"]["lookahead"]

    # A reload asked for while a reply streams waits for it (or the reply waits for the reload):
    # both finish, and the reply is whole.
    job = client.submit(QUESTION, [], 24, api_name="/chat")
    _, _, restored = client.predict(budget_mib, before["engine"]["lookahead"], transport, api_name="/reload")
    list(job)
    assert "Paris" in _reply_text(job.outputs()[-1][1])
    assert restored["engine"]["lookahead"] == before["engine"]["lookahead"]


def test_history_becomes_chat_messages() -> None:
    from torus_adapters.apps.demo_session import to_messages

    history = [  # as the Chatbot hands it back: content as a list of text parts
        {"role": "user", "metadata": None, "content": [{"text": "Hi", "type": "text"}], "options": None},
        {"role": "assistant", "content": [{"text": "Hello", "type": "text"}, {"text": "!", "type": "text"}]},
    ]
    assert to_messages(history, "Bye") == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]


def test_browser_chat(app_url: str, artifacts: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    shot = artifacts / "gradio_app.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            box = page.locator("#message textarea")
            box.fill(QUESTION)
            box.press("Enter")
            chat = page.locator("#chat")
            expect(chat).to_contain_text("Paris", timeout=90_000)
            stats = page.locator("#stats")
            expect(stats).not_to_contain_text("Reply in progress", timeout=90_000)  # the stream has ended
            expect(stats).to_contain_text("streamed from host RAM")
            for plot in ("#speed", "#traffic"):  # Vega draws each plot once it has points
                expect(page.locator(f"{plot} canvas, {plot} svg").first).to_be_visible()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 0
