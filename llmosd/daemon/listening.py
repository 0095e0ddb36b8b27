"""The listeners stage: the HTTP application on the Unix socket and TCP (bound here, or passed by systemd)."""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from llmosd.api import AppState, make_app
from llmosd.api.connections import CONNECTIONS, LINGER_S, GuardedSite
from llmosd.config import Config
from llmosd.daemon.chain import Stage
from llmosd.listeners import bind_tcp, bind_unix, describe, remove_socket_file
from llmosd.systemd import listen_fds

log = logging.getLogger("llmosd")


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

    def __init__(self, state: AppState) -> None:
        self.state, self.live = state, state.live
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
            await self._serve(socks)
        except BaseException:
            await self.stop()
            for sock in socks:
                sock.close()
            raise
        log.info("listening on %s%s", ", ".join(self.live.listeners), " (sockets from systemd)" * self._activated)

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
        for sock in socks:
            await GuardedSite(runner, sock, app[CONNECTIONS]).start()
            self.live.listeners = (*self.live.listeners, describe(sock))

    async def stop(self) -> None:
        """Close the listeners, wait for in-flight requests (up to shutdown_timeout_s), and remove the
        socket file whatever happened (systemd's own socket stays for the next start)."""
        config = self.live.config
        try:
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            if config.socket_enabled and not self._activated:
                remove_socket_file(Path(config.socket))
