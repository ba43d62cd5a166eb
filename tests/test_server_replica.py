"""`server.replica`: one member of a fleet (what the Ray deployment runs), tested in process without
Ray: its id on every answer and on /torus/stats, health, live re-attach, the drain at shutdown.
And the rule that the core and the plain server never import Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
import torch
import transformers as T

from torus_adapters.server import ServerSettings
from torus_adapters.server.replica import REPLICA_HEADER, EngineFailed, Replica
from torus_plugins import TorusConfig, TorusModel, attach

CONFIG = TorusConfig(transport="copy", resident_layers=0)


@pytest.fixture
def replica(request) -> Replica:
    """A replica of a random-init two-layer Llama with SmolLM2's tokenizer (its own, not shared).
    Its drain's grace: 60 s, or the test's (`@pytest.mark.parametrize("replica", [0.05], indirect=True)`)."""
    from torus_adapters.transformers_adapter.default_model import default_model_path

    grace = getattr(request, "param", 60.0)
    tokenizer = T.AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = T.AutoModelForCausalLM.from_config(config).eval()
    attach(model, CONFIG)
    r = Replica(TorusModel(model, tokenizer), ServerSettings(model_name="tiny", shutdown_timeout=grace), "r1")
    yield r
    r.service.close()
    r.scheduler.close()


def chat(max_tokens: int = 4, **extra) -> dict:
    return {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **extra}


def endless(replica: Replica) -> dict:
    """A greedy request that cannot end before its 480 tokens (its end-of-text token is barred)."""
    eos = replica.tm.tokenizer.eos_token_id
    return chat(480, temperature=0, logit_bias={str(eos): -100})


def run(replica: Replica, body) -> None:
    """Run `body(client)` on one event loop with the replica's ASGI app (what Ray's replica calls)."""

    async def main() -> None:
        transport = httpx.ASGITransport(app=replica.asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=60) as client:
            await body(client)

    asyncio.run(main())


def test_every_answer_names_the_replica_and_stats_count_what_it_did(replica):
    async def body(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/chat/completions", json=chat(temperature=0))
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "r1"
        assert (await client.get("/health")).headers[REPLICA_HEADER] == "r1"
        stats = (await client.get("/torus/stats")).json()
        assert stats["replica"] == "r1" and stats["pid"] > 0 and stats["host"]
        assert sum(stats["requests"]["finished"].values()) == 1 and stats["tokens"]["generated"] >= 1
        assert stats["config"]["transport"] == "copy" and stats["engine"]["bytes_moved"] > 0

    run(replica, body)


def test_health_fails_when_the_engine_fails_and_recovers_with_it(replica, monkeypatch):
    replica.check_health()  # fresh: healthy
    model = replica.tm.model

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def failing(client: httpx.AsyncClient) -> None:
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 500

    monkeypatch.setattr(model, "forward", broken)
    run(replica, failing)
    with pytest.raises(EngineFailed, match="2 requests failed since the last health check"):
        replica.check_health()
    monkeypatch.undo()

    async def working(client: httpx.AsyncClient) -> None:
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200

    run(replica, working)
    replica.check_health()  # a pass succeeded: healthy again
    replica.tm.detach()
    with pytest.raises(EngineFailed, match="no engine is attached"):
        replica.check_health()
    attach(model, CONFIG)
    replica.check_health()


def test_reconfigure_reattaches_between_requests_and_refuses_nothing(replica):
    new = TorusConfig(transport="copy", resident_layers=1, lookahead=2)

    async def body(client: httpx.AsyncClient) -> None:
        long = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(48, temperature=0)))
        while not replica.scheduler.in_flight:  # the long request is being generated
            await asyncio.sleep(0.01)
        swap = asyncio.ensure_future(replica.reconfigure(new))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(4)))  # waits at the gate
        first = await long
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] >= 1
        assert await swap is True
        assert (await late).status_code == 200
        stats = (await client.get("/torus/stats")).json()
        assert stats["reconfigurations"] == 1 and stats["config"]["resident_layers"] == 1
        assert await replica.reconfigure(new) is False  # the same config: nothing to do

    run(replica, body)
    assert replica.tm.config == new


def test_a_config_that_cannot_attach_leaves_the_previous_engine(replica):
    async def body(client: httpx.AsyncClient) -> None:
        with pytest.raises(Exception, match="no-such-transport"):
            await replica.reconfigure(TorusConfig(transport="no-such-transport"))
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200  # the gate is open

    run(replica, body)
    assert replica.tm.config == CONFIG and replica.reconfigurations == 0
    replica.check_health()


@pytest.mark.parametrize("replica", [0.05], indirect=True, ids=["grace-0.05s"])
def test_a_reconfigure_past_the_grace_ends_the_running_generation_typed(replica):
    async def body(client: httpx.AsyncClient) -> None:
        long = asyncio.ensure_future(client.post("/v1/chat/completions", json=endless(replica)))
        while not replica.scheduler.in_flight:
            await asyncio.sleep(0.01)
        assert await replica.reconfigure(TorusConfig(transport="copy", resident_layers=1)) is True
        r = await long
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200  # open again

    run(replica, body)


@pytest.mark.parametrize("replica", [0.05], indirect=True, ids=["grace-0.05s"])
def test_shutdown_drains_with_the_servers_typed_error(replica):
    async def body(client: httpx.AsyncClient) -> None:
        long = asyncio.ensure_future(client.post("/v1/chat/completions", json=endless(replica)))
        while not replica.scheduler.in_flight:
            await asyncio.sleep(0.01)
        await replica.shutdown()  # 0.05 s of grace, then the "shutting down" error
        r = await long
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"

    run(replica, body)
    assert replica.service.draining


def test_the_core_and_the_plain_server_never_import_ray():
    code = (
        "import sys, torus_plugins, torus_adapters.server, torus_adapters.server.replica, torus_adapters.apps.cli\n"
        "from torus_adapters.apps.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--ray', '--replicas', '2'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
