"""The model loader `torus-sparse transformers-serve` hands to `transformers serve` (transformers >= 5.25).

From 5.25 on, `transformers serve` loads each model in a process of its own, started with the
`spawn` method: a fresh interpreter where nothing the parent did (`enable()`, patched classes)
exists. The one object of the parent's that reaches that process is the server's `ModelLoader`,
pickled with it: so the engine's configuration travels inside a `ModelLoader` subclass, and
`load_model_and_processor` (which runs in the model's process) enables streaming there, loads,
and opens a stats channel.

The stats channel: the model's process listens on a Unix socket in a directory the parent made,
answering each connection with its engines' counters; the parent's `GET /torus/stats` asks every
socket there (one per model process; a model that was unloaded leaves a dead socket, skipped).
"""

from __future__ import annotations

import logging
import os
import threading
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from transformers.cli.serving.model_manager import ModelLoader

from torus_plugins import TorusConfig

log = logging.getLogger(__name__)

# The settings `run` gives the loader `transformers serve` constructs (it builds it itself, from
# its own arguments, so they cannot be passed in): set once in the parent before `Serve` starts.
_settings: dict[str, Any] = {}


def configure(config: TorusConfig, stats_dir: Path, authkey: bytes) -> None:
    """What every `TorusModelLoader` built from now on in this process carries to its model's process."""
    _settings.update(config=config, stats_dir=str(stats_dir), authkey=authkey)


class TorusModelLoader(ModelLoader):
    """`transformers serve`'s loader, with FFN streaming enabled in the process that loads the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not _settings:
            raise RuntimeError("torus-sparse: TorusModelLoader built before serve_loader.configure()")
        # Instance attributes: pickled with the loader into the model's process.
        self.torus_config: TorusConfig = _settings["config"]
        self.torus_stats_dir: str = _settings["stats_dir"]
        self.torus_authkey: bytes = _settings["authkey"]

    def load_model_and_processor(self, model_id: str, *args: Any, **kwargs: Any) -> Any:
        from .enable import enable

        enable(self.torus_config)
        model, processor = super().load_model_and_processor(model_id, *args, **kwargs)
        _serve_stats(Path(self.torus_stats_dir) / f"{os.getpid()}.sock", self.torus_authkey)
        return model, processor


def _serve_stats(address: Path, authkey: bytes) -> None:
    """Answer every connection on `address` with this process's engine counters (a daemon thread)."""
    from .transformers_serve import engine_stats

    listener = Listener(str(address), family="AF_UNIX", authkey=authkey)

    def answer() -> None:
        while True:
            try:
                with listener.accept() as conn:
                    conn.send(engine_stats())
            except Exception as exc:  # a client that hung up or failed the key: keep answering others
                log.debug("torus stats channel: %s", exc)

    threading.Thread(target=answer, name="torus-stats", daemon=True).start()


def collect_stats(stats_dir: Path, authkey: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The engines of every live model process that serves stats under `stats_dir`."""
    engines: list[dict[str, Any]] = []
    for address in sorted(stats_dir.glob("*.sock")):
        try:
            with Client(str(address), family="AF_UNIX", authkey=authkey) as conn:
                if not conn.poll(timeout):
                    raise TimeoutError(f"no answer within {timeout} s")
                engines.extend(conn.recv()["engines"])
        except (ConnectionRefusedError, FileNotFoundError):  # that model's process has stopped
            address.unlink(missing_ok=True)
        except (OSError, EOFError, TimeoutError) as exc:
            log.warning("torus-sparse: no stats from %s: %s", address.name, exc)
    return engines
