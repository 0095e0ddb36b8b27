"""Socket activation (sd_listen_fds(3)): systemd passes listening sockets as fds 3, 4, … with
``LISTEN_PID`` (must be us), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (colon-separated names
from ``FileDescriptorName=``). The variables are removed once read, so children do not take the fds."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

FIRST_FD = 3


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The passed sockets with their names (``unknown`` where none was given); [] when none are ours."""
    env = os.environ if environ is None else environ
    try:
        pid, count = int(env.get("LISTEN_PID", "0")), int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    out = []
    for i in range(count):
        fd = FIRST_FD + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type read from the fd
        sock.setblocking(False)
        out.append((names[i] if i < len(names) and names[i] else "unknown", sock))
    return out
