"""Where a client connects: an explicit socket or URL, the local Unix socket, ``LLMOSD_URL``, or an
appliance found on the LAN by mDNS (chosen by name or id, else the first by name)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmosd.client.errors import ConnectionFailed
from llmosd.config import client_socket, default_socket, default_state_dir
from llmosd.discovery.txt import Appliance


@dataclass(frozen=True)
class Target:
    socket: str | None = None
    url: str | None = None  # base URL, e.g. http://10.0.0.5:11411
    appliance: Appliance | None = None  # when found by discovery
    fallbacks: tuple[str, ...] = ()  # the appliance's other addresses, tried when ``url`` does not connect

    @property
    def where(self) -> str:
        return f"unix:{self.socket}" if self.socket else str(self.url)

    def next(self) -> Target | None:
        """The same appliance at its next address, if it has one."""
        if not self.fallbacks:
            return None
        return Target(url=self.fallbacks[0], appliance=self.appliance, fallbacks=self.fallbacks[1:])


def local_target(url: str | None, socket: str | Path | None) -> Target | None:
    """The explicit socket or URL, else the local socket if it exists, else ``LLMOSD_URL``; None if
    none of them is there (the caller then looks on the LAN)."""
    if socket is not None:
        return Target(socket=str(socket))
    if url is not None:
        return Target(url=url if "://" in url else f"http://{url}")
    local = client_socket(Path(os.environ.get("LLMOSD_SOCKET") or default_socket(default_state_dir())))
    if local.is_socket():
        return Target(socket=str(local))
    if env := os.environ.get("LLMOSD_URL"):
        return Target(url=env if "://" in env else f"http://{env}")
    return None


def pick(found: Sequence[Appliance], name: str | None = None, id: str | None = None) -> Target:
    """The appliance with this id, else this name, else the first by name."""
    chosen = [a for a in found if (id is None or a.id == id) and (name is None or a.name == name)]
    if not chosen:
        seen = ", ".join(f"{a.name} ({a.id[:8]})" for a in found) or "none"
        wanted = " and ".join(x for x in (f"name {name!r}" if name else "", f"id {id!r}" if id else "") if x)
        raise ConnectionFailed(f"no llmosd with {wanted or 'any name'} found on the LAN (found: {seen})")
    a = sorted(chosen, key=lambda x: (x.name, x.id))[0]
    return Target(url=a.urls[0], appliance=a, fallbacks=tuple(a.urls[1:]))


def nothing_local(socket: Path | None = None) -> str:
    local = socket or Path(os.environ.get("LLMOSD_SOCKET") or default_socket(default_state_dir()))
    return f"no daemon socket at {local}, LLMOSD_URL is not set"
