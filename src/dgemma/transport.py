"""HTTP/1.1 transport settings for uvicorn: its h11 protocol with a request-head deadline and TCP_NODELAY.

uvicorn arms a timer only between requests (keep-alive), and cancels it on the first byte of the next request, so a
client that trickles a request head one byte a second (slowloris) holds its connection forever; a connection that
sends nothing is never closed either. `HardenedH11` closes a connection whose request head is not complete within
`head_timeout` seconds of its first byte (or of the connection opening), with a bare 408. It also sets TCP_NODELAY
on every accepted socket: asyncio sets it only on sockets created with `proto=IPPROTO_TCP`, and without it a
kept-alive connection waits out the client's delayed ACK (~40 ms) between the response head and body writes.
The body deadline, header size and count limits, Host and framing checks live in `asgi.Guard` (one place for every
request-level rule); this module only owns what happens before a request exists. Nothing here knows dgemma.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT = 10.0  # seconds for a request head (hardening notes: header read 10 s)
KEEP_ALIVE = 5.0
GRACE = 30.0  # shutdown: in-flight streams drain this long, then end with an error event


class HardenedH11(H11Protocol):
    """uvicorn's h11 protocol plus a request-head deadline and TCP_NODELAY."""

    head_timeout = HEAD_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # these bytes belong to the next request's head
            self._arm()
        super().data_received(data)
        if self.cycle is not cycle:  # a request head was parsed
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return
        # no h11 response is possible before a request head; a bare 408, then close
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        self.transport.close()


def uvicorn_options(log_level: str = "info", grace: float = GRACE) -> dict:
    """uvicorn.Config keywords every dgemma server uses: the hardened protocol and the timeouts. uvicorn's own
    graceful-shutdown timeout is a backstop a little past dgemma's drain (`server.drain`), which ends streams
    cleanly at `grace`."""
    return {
        "http": f"{__name__}:HardenedH11",
        "log_level": log_level,
        "timeout_keep_alive": KEEP_ALIVE,
        "timeout_graceful_shutdown": grace + 5,
        "proxy_headers": False,  # no proxy is trusted: the client address is the socket's
    }
