"""A TLS listener that answers plain HTTP clearly instead of with a reset.

asyncio's TLS server starts the handshake on every connection, so a client that speaks plain HTTP to
it gets a closed connection and no reason. Here the accept loop looks at each connection's first byte
(without taking it): a TLS handshake record (0x16) goes to ``connect_accepted_socket`` with the
context, anything else gets a plain 400 that says to use https, the way nginx answers "the plain HTTP
request was sent to HTTPS port". The connections then go through the same ``Connections`` guard as
every other listener's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from llmosd.api.connections import Connections, GuardedSite, raw_response
from llmosd.logs import printable

log = logging.getLogger("llmosd.api")

TLS_HANDSHAKE = 0x16  # the content type of a TLS record that starts a handshake
PLAIN_READ_S = 1.0  # how long a plain request's bytes are read (and dropped) around the refusal


async def _first_byte(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The connection's first byte, left in the socket for whoever reads next; b"" if it closed."""
    readable: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return conn.recv(1, socket.MSG_PEEK)


class _Acceptor:
    """What aiohttp's site keeps as its server: it closes it, and lists its sockets."""

    def __init__(self, sock: socket.socket, accept: asyncio.Task[None]) -> None:
        self.sockets = [sock]
        self._accept = accept

    def close(self) -> None:
        self._accept.cancel()


class TlsSite(GuardedSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        connections: Connections,
        context: ssl.SSLContext,
        timeout_s: Callable[[], float],
    ) -> None:
        super().__init__(runner, sock, connections)
        self._context = context
        self._timeout_s = timeout_s  # the header timeout: the first byte and the handshake get as long
        self._pending: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._factory = self._connections.factory(server)
        self._accepting = asyncio.create_task(self._accept_loop())
        self._server = _Acceptor(self._sock, self._accepting)  # type: ignore[assignment]

    async def stop(self) -> None:
        await super().stop()  # cancels the accept loop
        for task in [self._accepting, *self._pending]:
            task.cancel()
        await asyncio.gather(self._accepting, *self._pending, return_exceptions=True)
        self._sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: the next accept may succeed
                log.warning("accepting a TLS connection failed: %s", exc.strerror)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._begin(loop, conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _begin(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        timeout = self._timeout_s()
        try:
            async with asyncio.timeout(timeout):
                first = await _first_byte(loop, conn)
        except (TimeoutError, OSError):
            conn.close()
            return
        if not first:
            conn.close()
        elif first[0] == TLS_HANDSHAKE:
            try:
                await loop.connect_accepted_socket(
                    self._factory, conn, ssl=self._context, ssl_handshake_timeout=timeout
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:  # a scanner, an old client, a hang-up
                log.debug("a TLS handshake failed: %s", exc)
                conn.close()
        else:
            await self._refuse_plain(loop, conn)

    async def _refuse_plain(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            peer, here = conn.getpeername(), conn.getsockname()
            host = f"[{here[0]}]" if ":" in here[0] else here[0]
            message = f"this port speaks HTTPS only: use https://{host}:{here[1]}/ (plain HTTP is refused)"
            self._warn_plain(str(peer[0]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLAIN_READ_S):  # the request first: answering unread bytes resets
                    await loop.sock_recv(conn, 65536)
            await loop.sock_sendall(conn, raw_response("400 Bad Request", message, "tls_required"))
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLAIN_READ_S):
                    while await loop.sock_recv(conn, 65536):
                        pass
        except OSError:
            pass
        finally:
            conn.close()

    def _warn_plain(self, address: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # one line per 10 s: a scanner must not flood the journal
            self._last_warning = now
            log.warning(
                "refused plain HTTP from %s on the TLS port (its token, if it sent one, went in clear)",
                printable(address),
            )
