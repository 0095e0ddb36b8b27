"""Process-wide logging set-up: the journal's native protocol with structured fields when systemd
connected stderr to the journal, plain text on stderr otherwise. The request id and model of the
request being handled ride along as context variables."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
MODEL: ContextVar[str | None] = ContextVar("model", default=None)


# Control characters (a newline forges a log line, ESC drives a terminal, NUL cuts a C string), the
# Unicode line separators, and lone surrogates (unencodable): what a client can put in a path or a name.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, limit: int = 300) -> str:
    """``value`` as one safe line for a log: control characters escaped, cut at ``limit`` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return _UNSAFE.sub(_escape, text)


class EscapeFilter(logging.Filter):
    """Makes every record's message one line whatever its arguments hold (client strings included):
    the last guard against a forged line, after each call site's own ``printable``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _UNSAFE.search(message):
            record.msg, record.args = _UNSAFE.sub(_escape, message), None
        return True


class TextFormatter(logging.Formatter):
    """Plain text on stderr; the lines after a record's first (a traceback) are indented, so no line
    of a record can pass for the start of another."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\n    ")


class ContextFilter(logging.Filter):
    """Copies the context variables onto each record (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "model", None) is None:
            model = MODEL.get()  # as the client named it: kept to one printable line
            record.model = printable(model, 100) if model is not None else None
        return True


def setup_logging(level: str) -> str:
    """Configure the root logger; where the records go ("journal" or "stderr")."""
    from llmosd.systemd.journal import JournalHandler, journal_stream

    handler: logging.Handler
    if journal_stream():
        handler, where = JournalHandler(), "journal"
    else:
        handler, where = logging.StreamHandler(), "stderr"
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    handler.addFilter(EscapeFilter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return where


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
