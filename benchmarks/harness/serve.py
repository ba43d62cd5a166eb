"""A real server for the serving benchmarks: uvicorn on 127.0.0.1, in this process's thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class Server:
    """uvicorn serving the app on 127.0.0.1:<free port> in a daemon thread (uvicorn imported here,
    so importing the harness costs torch only)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
