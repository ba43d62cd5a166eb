"""When the model fails mid-generation, each client gets a typed error in its own format that names
a reference, never the exception's text; the server log has the text under that reference."""

from __future__ import annotations

import logging
import re

import openai
import pytest
import requests
import text_generation
from server_fixtures import ServerThread, tiny_model

from torus_adapters.server import ServerSettings, create_app
from torus_plugins.errors import TransferError

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")

SECRET = "copying FFN layer 1 from /srv/secret/host-store failed: device fault 700"


@pytest.fixture
def failing_server():
    """A server of the tiny model whose second decoder layer raises a TransferError while armed."""
    tm = tiny_model()
    srv = ServerThread(create_app(tm, ServerSettings(model_name="tiny")))

    def fail(module, args):
        raise TransferError(SECRET)

    hook = tm.model.model.layers[1].register_forward_pre_hook(fail)
    try:
        yield srv.url, hook
    finally:
        hook.remove()
        srv.stop()


def test_a_model_failure_is_typed_and_names_only_a_reference(failing_server, caplog):
    url, hook = failing_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    tgi = text_generation.Client(url, timeout=60)
    messages = []
    with caplog.at_level(logging.ERROR, logger="torus_adapters.server"):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert info.value.status_code == 500 and info.value.body["type"] == "server_error"
        messages.append(info.value.body["message"])
        with pytest.raises(openai.APIError) as info:  # the stream's error event
            list(client.completions.create(model="x", prompt="Hi", max_tokens=3, stream=True))
        messages.append(info.value.message)
        with pytest.raises(text_generation.errors.GenerationError) as info:
            tgi.generate("Hi", max_new_tokens=3)
        messages.append(str(info.value))
        with pytest.raises(text_generation.errors.GenerationError) as info:
            list(tgi.generate_stream("Hi", max_new_tokens=3))
        messages.append(str(info.value))
        r = requests.post(f"{url}/generate", json={"inputs": "Hi"}, timeout=60)
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
    for message in messages:
        assert "TransferError" not in message and "/srv/secret" not in message
        ref = re.search(r"reference ([0-9a-f]{8})", message).group(1)
        assert f"(reference {ref})" in caplog.text  # the log has the reference ...
    assert SECRET in caplog.text  # ... and the details
    hook.remove()  # the fault clears: the same server answers again
    assert client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
