"""The listeners stage: the HTTP application on the Unix socket and TCP (bound here, or passed by systemd)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from llmosd.api import AppState, make_app
from llmosd.api.connections import CONNECTIONS, LINGER_S, GuardedSite
from llmosd.api.tlsport import TlsSite
from llmosd.config import Config
from llmosd.daemon.chain import Stage, cancel
from llmosd.listeners import bind_tcp, bind_unix, describe, remove_socket_file
from llmosd.reload import TLS, Reload
from llmosd.systemd import listen_fds
from llmosd.tls import CertError
from llmosd.tls.server import ServerTls, wanted

log = logging.getLogger("llmosd")
RENEW_CHECK_S = 3600.0  # how often the certificate is looked at again (renewal, new addresses, new files)


def _sockets(config: Config) -> tuple[list[socket.socket], bool]:
    """The sockets systemd passed (socket activation), else the ones the config asks us to bind; and
    whether they were passed (then systemd owns the socket file: it must outlive this process)."""
    passed = [sock for _, sock in listen_fds() if sock.type == socket.SOCK_STREAM]
    if passed:
        return passed, True
    socks: list[socket.socket] = []
    try:
        if config.socket_enabled:
            socks.append(bind_unix(config.socket))
        if config.tcp_enabled:
            socks.append(bind_tcp(config.host, config.port))
    except BaseException:
        _close(socks, config)
        raise
    return socks, False


def _close(socks: list[socket.socket], config: Config) -> None:
    for sock in socks:
        if sock.family == socket.AF_UNIX:
            remove_socket_file(Path(config.socket))
        sock.close()


class ListenerStage(Stage):
    name = "listeners"

    def __init__(self, state: AppState, tls: ServerTls) -> None:
        self.state, self.live = state, state.live
        self.tls = tls
        self.tls_host = ""  # the TCP listener's address, when it speaks TLS
        self._renewal: asyncio.Task[None] | None = None
        self.passed: dict[str, Any] = {}  # config values set by systemd's sockets (a reload keeps them)
        self.tcp_port = 0  # the port really bound (port = 0 picks one); 0: no TCP listener
        self._activated = False
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        socks, self._activated = _sockets(self.live.config)
        tcp = [s for s in socks if s.family in (socket.AF_INET, socket.AF_INET6)]
        self.tcp_port = tcp[0].getsockname()[1] if tcp else 0
        if self._activated:  # the socket unit chose the addresses: mDNS, the LAN checks and the status follow it
            unix = [s for s in socks if s.family == socket.AF_UNIX]
            self.passed = {"socket": Path(unix[0].getsockname())} if unix else {"socket": Path("none")}
            if tcp:
                self.passed |= {"host": tcp[0].getsockname()[0], "port": self.tcp_port}
            self.live.config = dataclasses.replace(self.live.config, **self.passed)
        try:
            if tcp and wanted(self.live.config, tcp[0].getsockname()[0]):
                await self._load_tls(tcp[0].getsockname()[0])
            elif tcp and self.live.config.tls == "auto":
                where = describe(tcp[0])
                log.info('TLS: off on %s, which is loopback only (tls = "on" turns it on there too)', where)
            await self._serve(socks)
        except BaseException:
            await self.stop()
            for sock in socks:
                sock.close()
            raise
        log.info("listening on %s%s", ", ".join(self.live.listeners), " (sockets from systemd)" * self._activated)
        if self.live.tls is not None:
            self._renewal = asyncio.create_task(self._keep_renewed())

    async def _load_tls(self, host: str) -> None:
        """The certificate into the context; at start a CertError stops the daemon with its reason."""
        self.tls_host = host
        await asyncio.to_thread(self.tls.load, self.live.config, host)
        cert = self.tls.certificate
        assert cert is not None
        log.info(
            "TLS on the TCP port: %s certificate, SHA-256 fingerprint %s, valid until %s",
            self.tls.source,
            cert.fingerprint,
            f"{cert.not_after:%Y-%m-%d}",
        )
        self.live.tls = self.tls

    async def _refresh_tls(self, why: str) -> None:
        """Load the certificate again; a new one is announced (the mDNS fp= record), a broken one logged
        while the one in use stays."""
        try:
            changed = await asyncio.to_thread(self.tls.load, self.live.config, self.tls_host)
        except CertError as exc:
            log.error("TLS (%s): %s; the certificate in use stays", why, exc)
            return
        if changed and self.tls.certificate is not None:
            log.info("TLS (%s): now presenting the certificate %s", why, self.tls.certificate.fingerprint)
            if self.live.advertiser is not None:
                self.live.advertiser.changed()

    async def _keep_renewed(self) -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK_S)
            await self._refresh_tls("hourly check")

    async def reload(self, change: Reload) -> None:
        """Every reload loads the pair again: a site's renewed files are picked up in place."""
        if self.live.tls is not None:
            await self._refresh_tls("reload" if not set(change.applied) & TLS else "reload, new files")

    async def _serve(self, socks: list[socket.socket]) -> None:
        config = self.live.config
        app = make_app(self.state)
        self._runner = runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=config.shutdown_timeout_s,
            handler_cancellation=True,  # a client that hangs up cancels its handler, freeing generation rows
            keepalive_timeout=config.keepalive_timeout_s,  # aiohttp's default is an hour
            lingering_time=LINGER_S,  # after a 408/413, read what the client still sends this long, then close
        )
        await runner.setup()
        connections = app[CONNECTIONS]
        for sock in socks:
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            if tcp and self.tls_host:
                header_s = lambda: self.live.config.header_timeout_s  # noqa: E731 (read at each use: reloads)
                await TlsSite(runner, sock, connections, self.tls.context, header_s).start()
            else:
                await GuardedSite(runner, sock, connections).start()
            self.live.listeners = (*self.live.listeners, describe(sock))

    async def stop(self) -> None:
        """Close the listeners, wait for in-flight requests (up to shutdown_timeout_s), and remove the
        socket file whatever happened (systemd's own socket stays for the next start)."""
        config = self.live.config
        await cancel(self._renewal)
        try:
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            if config.socket_enabled and not self._activated:
                remove_socket_file(Path(config.socket))
