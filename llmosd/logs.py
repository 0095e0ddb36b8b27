"""Process-wide logging set-up: the journal's native protocol with structured fields when systemd
connected stderr to the journal, plain text on stderr otherwise. The request id and model of the
request being handled ride along as context variables."""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
MODEL: ContextVar[str | None] = ContextVar("model", default=None)


class ContextFilter(logging.Filter):
    """Copies the context variables onto each record (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "model", None) is None:
            record.model = MODEL.get()
        return True


def setup_logging(level: str) -> str:
    """Configure the root logger; where the records go ("journal" or "stderr")."""
    from llmosd.systemd.journal import JournalHandler, journal_stream

    handler: logging.Handler
    if journal_stream():
        handler, where = JournalHandler(), "journal"
    else:
        handler, where = logging.StreamHandler(), "stderr"
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return where


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
