"""sd_notify(3): datagrams of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace). Where systemd-python is installed its ``daemon.notify`` sends them; otherwise this
module does, which is all that function does too."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _fallback_sender(address: str) -> Callable[[str], bool]:
    target = "\0" + address[1:] if address.startswith("@") else address

    def send(message: str) -> bool:
        # Non-blocking: a notify socket nobody reads (its queue holds net.unix.max_dgram_qlen datagrams,
        # 10 by default) must drop a message, never stall the event loop that sends it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            try:
                s.sendto(message.encode(), target)
            except OSError as exc:  # systemd gone, or the socket not ours: never fatal
                log.debug("sd_notify to %s failed: %s", address, exc)
                return False
        return True

    return send


def _sender(address: str) -> tuple[Callable[[str], bool], str]:
    """The sending function and what it is ("systemd-python" or "built-in")."""
    try:  # systemd-python (Debian's python3-systemd), by name: it has no type information
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return _fallback_sender(address), "built-in"

    def send(message: str) -> bool:
        return bool(daemon.notify(message))

    return send, "systemd-python"


class Notifier:
    """The service side of sd_notify. Without ``NOTIFY_SOCKET`` every call does nothing and says so
    (False), so the daemon calls it unconditionally."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self._send: Callable[[str], bool] | None = None
        self.via = ""  # "systemd-python" or "built-in"
        if self.address:
            self._send, self.via = _sender(self.address)
        self.watchdog_s = self._watchdog_interval(env)
        self.last_status = ""

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """The watchdog timeout systemd expects pings within (WatchdogSec=), when it is for this process."""
        with contextlib.suppress(ValueError):
            pid = env.get("WATCHDOG_PID")
            if pid is not None and int(pid) != os.getpid():
                return None
            usec = int(env.get("WATCHDOG_USEC", "0"))
            return usec / 1e6 if usec > 0 else None
        return None

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def send(self, **fields: str | int) -> bool:
        if self._send is None:
            return False
        return self._send("\n".join(f"{k}={v}" for k, v in fields.items()))

    def ready(self, status: str) -> bool:
        self.last_status = status
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        if text == self.last_status:
            return False
        self.last_status = text
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 tell this reload from an older one; earlier ones ignore it
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> bool:
        self.last_status = status  # the heartbeat, which pings through the drain, need not say it again
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for this much more time for the current start-up or stop (a first-start export)."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))
