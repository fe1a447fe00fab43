"""A deadline for reading each HTTP request, which uvicorn lacks.

uvicorn closes a connection that stays idle between requests (`timeout_keep_alive`), but once a client
has sent the first byte of a request nothing bounds how long it may take to send the rest: a client that
trickles its headers or body a byte at a time (slowloris) holds a connection, and its memory, for as long
as it likes. `read_timeout_protocol(s)` is uvicorn's own h11 protocol with one addition: from the moment
a connection opens, or the first byte of a later request arrives, the client has `s` seconds to deliver
the whole request (headers and body); otherwise the connection is closed, as nginx does with its
`client_header_timeout`. The server side (computing and streaming the answer) is not limited.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pregate.errors import PregateError

READ_TIMEOUT_S = 30.0  # seconds a client gets to send one whole request


class ReadTimeoutH11Protocol(H11Protocol):
    read_timeout_s = READ_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # IDLE: the request line and headers are still coming in; SEND_BODY: its body is
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            if self._deadline is None:
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # a handler still waiting for the body sees the client disconnect


def read_timeout_protocol(seconds: float = READ_TIMEOUT_S) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a `seconds` deadline for reading each request: `uvicorn.Config(http=)`."""
    if not seconds > 0:
        raise PregateError(f"a request read timeout must be > 0 seconds, got {seconds!r}")
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout_s": float(seconds)})
