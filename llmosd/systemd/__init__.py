"""Speaking systemd's protocols: sd_notify (readiness, status, watchdog, reload, stop), socket activation
(LISTEN_FDS) and the journal's native protocol. Each is a few lines of a documented wire format, written
here so a pip install on any host works; off systemd each is a no-op."""

from llmosd.systemd.journal import JournalHandler, journal_stream
from llmosd.systemd.listen import listen_fds
from llmosd.systemd.notify import Notifier

__all__ = ["JournalHandler", "Notifier", "journal_stream", "listen_fds"]
