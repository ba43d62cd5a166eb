"""One HTTP/1.1 connection as the server keeps it: uvicorn's h11 protocol with what it lacks.

- A deadline for the request head (`header_timeout`): a connection that has not sent a complete
  head that long after it opened (or after its previous answer) is closed, so half-open and
  slow-loris sockets do not pile up.
- Caps on the head: at most `MAX_HEAD_BYTES` (16 KiB) and `MAX_HEADERS` header lines, whether the
  head trickles in or arrives in one read (h11's own limit only bounds a head still incomplete);
  beyond them, 431 in the route's error format, and the connection is closed.
- Half-closed requests are answered: a client may shut its write side once its request is sent
  (`shutdown(SHUT_WR)`, as netcat and some scripted clients do). uvicorn takes that EOF for a
  disconnect and the route cancels the generation. Here an EOF after a complete request, before
  its answer has started, keeps the connection open for the answer (an EOF once an answer is
  under way, a stream whose client left, is still a disconnect). A client that closed its socket
  altogether sends the same EOF, so until the answer starts the server writes an interim
  `100 Continue` every `PROBE_S` seconds (HTTP/1.1 clients must skip unexpected 1xx answers): to
  a live half-closed client it is nothing, a closed socket answers with a reset, the next write
  fails, and the generation is cancelled as for any disconnect. After the answer, the connection
  is closed.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import is_openai_path, openai_body, tgi_body

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
#: Seconds between two probes of a half-closed connection still waiting for its answer.
PROBE_S = 1.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def connection_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the head deadline, the head caps and half-close handling."""

    class ConnectionProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _probe_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _head_lines = 0
        _half_closed = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self._head_fits(data):
                return
            super().data_received(data)

        def eof_received(self) -> bool | None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and not cycle.more_body:
                self._half_closed = True  # the request is all here: keep the socket to answer it
                self._probe()
                return True
            # Half a request, none, or an answer already under way (a stream whose client left):
            # uvicorn closes the connection and the route sees the disconnect at once.
            return None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._half_closed:
                self.transport.close()
                return
            self._arm()  # the next request's head gets the same time

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._deadline, self._probe_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._head_bytes = self._head_lines = 0
            cycle = self.cycle  # replaced by uvicorn when a complete request head arrives

            def expire() -> None:
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self._deadline = self.loop.call_later(header_timeout, expire)

        def _probe(self) -> None:
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None or cycle.response_started or cycle.response_complete:
                return
            self.transport.write(_CONTINUE)
            self._probe_timer = self.loop.call_later(PROBE_S, self._probe)

        def _head_fits(self, data: bytes) -> bool:
            """Count the head's bytes and lines; answer 431 and close when it is over a cap."""
            end = data.find(b"\r\n\r\n")
            head = data if end < 0 else data[: end + 4]
            self._head_bytes += len(head)
            self._head_lines += head.count(b"\n")
            if self._head_bytes <= MAX_HEAD_BYTES and self._head_lines <= MAX_HEADERS + 2:
                return True
            what = f"more than {MAX_HEADERS} header lines" if self._head_lines > MAX_HEADERS + 2 else None
            self._refuse(data, what or f"a request head over {MAX_HEAD_BYTES // 1024} KiB")
            return False

        def _refuse(self, data: bytes, what: str) -> None:
            parts = data.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 2 else "/"
            limit = f"{MAX_HEAD_BYTES // 1024} KiB and {MAX_HEADERS} headers"
            message = f"the request has {what}; this server takes at most {limit}"
            if is_openai_path(path):
                body = openai_body(431, message, None, "request_header_fields_too_large")
            else:
                body = tgi_body(message, "validation")
            raw = json.dumps(body).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
            )
            self.transport.close()

    return ConnectionProtocol
