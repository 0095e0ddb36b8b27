"""Per-connection limits aiohttp lacks, for a daemon that faces the LAN: a header timeout, a write
timeout (a client that reads nothing of a response, a stream included, is dropped), and a cap on the
TCP connections one client address may hold, so one host cannot take every file descriptor.

aiohttp closes idle keep-alive connections itself (``keepalive_timeout``, also before a first request)
and the body read has its own rate rule (``requests.read_body``). What it has no hook for is wrapped
here: every listener's protocol sits inside a ``Guard`` that passes each call through and keeps the
timers. The ``mark`` middleware tells the guard when a request's headers were parsed and when its
handler is done, so the header timer runs only while a request is arriving.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from llmosd.api.parse_errors import ParseErrorLog, handlers
from llmosd.logs import printable

log = logging.getLogger("llmosd.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# After a refusal of our own, read (and drop) what the client still sends this long before closing:
# closing with its bytes unread makes the kernel answer RST, which can destroy the refusal in flight.
LINGER_S = 2.0


PROGRESS_CHECK_S = 0.5  # how often a connection that owes its client bytes is checked for progress


def tcp_progress(sock: Any) -> tuple[int, int] | None:
    """(bytes the peer has acknowledged, bytes sent and not yet acknowledged) of a TCP socket, from the
    kernel (TCP_INFO's tcpi_bytes_acked, Linux 4.1+, and SIOCOUTQ); None where it cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        owed = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError):
        return None
    if len(info) < 128:
        return None
    return struct.unpack_from("Q", info, 120)[0], owed


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    write_timeout_s: float
    max_per_client: int


def raw_response(status: str, message: str, type: str, headers: str = "") -> bytes:
    body = json.dumps({"error": {"type": type, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{headers}Connection: close\r\n\r\n"
    )
    return head.encode() + body


class Connections:
    """Shared by every listener of one daemon. ``limits`` is read at each use, so a reload applies."""

    def __init__(self, limits: Callable[[], Limits]) -> None:
        self.limits = limits
        self.per_address: Counter[str] = Counter()
        self.refused = 0
        self._guards: dict[asyncio.BaseTransport, Guard] = {}
        self._last_warning = 0.0
        self.parse_errors = ParseErrorLog()

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """Each connection: aiohttp's handler (answering a malformed request safely), inside a Guard."""
        make = handlers(server, self.parse_errors)
        return lambda: Guard(self, make())

    def guard(self, transport: asyncio.BaseTransport | None) -> Guard | None:
        return self._guards.get(transport) if transport is not None else None

    def warn_refused(self, address: str, limit: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warning > 10:  # one line per 10 s: a flood must not flood the journal too
            self._last_warning = now
            log.warning(
                "refused a connection from %s: it holds %d already (max_connections_per_client); %d refused so far",
                printable(address),
                limit,
                self.refused,
            )


class Guard(asyncio.Protocol):
    """Wraps one connection's aiohttp protocol; every call goes through, the timers ride along."""

    def __init__(self, owner: Connections, inner: asyncio.Protocol) -> None:
        self.owner = owner
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.address: str | None = None  # TCP clients only: the Unix socket is the box's own users
        self.refused = False
        self.in_request = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        # The client's progress, where the kernel tells it (TCP): acknowledged bytes and when they last grew
        self._progress_timer: asyncio.TimerHandle | None = None
        self._acked = -1
        self._acked_at = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # a stream transport: asyncio's, or uvloop's (which has the methods without the base class)
        transport = self.transport = cast(asyncio.Transport, base)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if address is not None:
            limit = self.owner.limits().max_per_client
            if self.owner.per_address[address] >= limit:
                self.refused = True
                message = f"too many connections from {address} (limit {limit}); close some and retry"
                refusal = raw_response("429 Too Many Requests", message, "rate_limit_error", "Retry-After: 1\r\n")
                transport.write(refusal)
                transport.close()
                self.owner.warn_refused(address, limit)
                return
            self.address = address
            self.owner.per_address[address] += 1
        self.owner._guards[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.refused or self._linger_timer is not None:
            return
        if not self.in_request and self._header_timer is None:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self.owner.limits().header_timeout_s, self._headers_late)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        lingering = self._linger_timer is not None
        return None if self.refused or lingering else self.inner.eof_received()

    def pause_writing(self) -> None:
        if self._write_timer is None and not self.refused:
            loop = asyncio.get_running_loop()
            self._write_timer = loop.call_later(self.owner.limits().write_timeout_s, self._write_stalled)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_write_timer()
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.refused:
            return
        if self.transport is not None:
            self.owner._guards.pop(self.transport, None)
        if self.address is not None:
            self.owner.per_address[self.address] -= 1
            if self.owner.per_address[self.address] <= 0:
                del self.owner.per_address[self.address]
        self.inner.connection_lost(exc)

    # ---- told by the middleware ----
    def started(self) -> None:
        self.in_request = True
        self._cancel_header_timer()
        if self._progress_timer is None and self.address is not None:
            self._acked, self._acked_at = -1, time.monotonic()
            self._progress_timer = asyncio.get_running_loop().call_later(PROGRESS_CHECK_S, self._check_progress)

    def finished(self) -> None:
        self.in_request = False

    # ---- timers ----
    def _headers_late(self) -> None:
        self._header_timer = None
        if self.in_request or self.transport is None or self.transport.is_closing():
            return
        limit = self.owner.limits().header_timeout_s
        log.info("closed a connection from %s: no complete request headers within %g s", self._who(), limit)
        message = f"the request headers did not arrive within {limit:g} s"
        self.transport.write(raw_response("408 Request Timeout", message, "timeout_error"))
        self._linger(self.transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Half-close after the answer and drop what still arrives (nginx's lingering_close)."""
        if transport.can_write_eof():
            transport.write_eof()
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self.transport is not None and not self.transport.is_closing():
            limit = self.owner.limits().write_timeout_s
            log.info("dropped a connection from %s: it took none of its response for %g s", self._who(), limit)
            self.transport.abort()  # the buffered response can never be delivered: free it now

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _check_progress(self) -> None:
        """A client that has taken none of what it is owed for write_timeout_s is dropped, timed from the
        last byte it acknowledged: the pause above only starts once the kernel's buffers and the
        transport's are full, which a slow stream (an SSE answer) takes minutes to do."""
        self._progress_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        progress = tcp_progress(sock) if sock is not None else None  # asyncio's TransportSocket, TLS or not
        if progress is None:
            return  # the pause timer alone
        acked, owed = progress
        now = time.monotonic()
        if owed == 0 or acked != self._acked:
            self._acked, self._acked_at = acked, now
        elif now - self._acked_at >= self.owner.limits().write_timeout_s:
            self._write_stalled()
            return
        if self.in_request or owed:
            self._progress_timer = asyncio.get_running_loop().call_later(PROGRESS_CHECK_S, self._check_progress)

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _who(self) -> str:
        return printable(self.address) if self.address is not None else "the Unix socket"


CONNECTIONS = web.AppKey("connections", Connections)


@web.middleware
async def mark(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the headers are in (stop the header timer) until the handler is done."""
    connections = request.app.get(CONNECTIONS)
    guard = connections.guard(request.transport) if connections is not None else None
    if guard is not None:
        guard.started()
    try:
        return await handler(request)
    finally:
        if guard is not None:
            guard.finished()


class GuardedSite(web.SockSite):
    """A SockSite whose connections go through ``Connections`` (aiohttp's own start, but for the
    protocol factory it hands the event loop)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, connections: Connections) -> None:
        super().__init__(runner, sock)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connections.factory(server), sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )
