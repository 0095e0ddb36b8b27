"""Logging to the journal over its native protocol (a datagram of fields to
``/run/systemd/journal/socket``), so each record keeps structured fields — PRIORITY, MODEL=,
REQUEST_ID=, CODE_* — instead of one line of text. Used when ``JOURNAL_STREAM`` says stderr already
goes to the journal (systemd set it up), so nothing is logged twice."""

from __future__ import annotations

import logging
import os
import socket
import struct
import traceback
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_MESSAGE = 48 * 1024  # a datagram larger than this may need a memfd; a log line never should
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def journal_stream(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is the journal stream systemd connected (``JOURNAL_STREAM=dev:inode``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def encode(fields: Mapping[str, str]) -> bytes:
    """The native protocol: ``KEY=value\\n``, or for a value with a newline ``KEY\\n`` + its length as a
    little-endian 64-bit number + the value + ``\\n``."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """One datagram per record. ``extra`` attributes ``model`` and ``request_id`` become MODEL= and
    REQUEST_ID=; the journal adds _PID, _SYSTEMD_UNIT and the time itself."""

    def __init__(self, identifier: str = "llmosd", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        out = {
            "MESSAGE": message[:MAX_MESSAGE],
            "PRIORITY": str(PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
        }
        for attr, field in (("model", "MODEL"), ("request_id", "REQUEST_ID")):
            if value := getattr(record, attr, None):
                out[field] = str(value)
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode(self.fields(record)), self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()
