"""The life of one worker thread: started, its death noticed, the work it held failed with a 503 that
says why, restarted with backoff, and given up on after too many deaths in a window.

Each scheduler worker (dynamic batcher, tensor batcher, generation engine) runs its loop through a
``Supervisor``. Whatever the loop raises, anywhere (a bug in collecting, running or delivering, a
BaseException from a native extension), ends in ``_died`` on the event loop, never in a silent thread
exit with futures that hang forever (Infinity's PR #668). The worker offers two callbacks: ``reset``
fails everything it holds or has queued and clears its state for a fresh thread, and ``gave_up`` tells
the pool to unload the model and report it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmosd.scheduler.errors import BatcherClosed

log = logging.getLogger(__name__)

MAX_DEATHS = 5  # in WINDOW_S: more, and the model is unloaded and reported instead of restarted
WINDOW_S = 60.0
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


def drain(inbox: queue.SimpleQueue[Any]) -> None:
    """Empty a dead worker's inbox (its requests are failed through the worker's open futures)."""
    while True:
        try:
            inbox.get_nowait()
        except queue.Empty:
            return


class WorkerDied(BatcherClosed):
    """The model's worker died; what it held failed, and it is being restarted (a 503, retry shortly)."""


class Supervisor:
    def __init__(
        self,
        thread_name: str,
        work: Callable[[], None],
        reset: Callable[[BaseException], None],
        gave_up: Callable[[str], None] | None = None,
    ) -> None:
        self.thread_name = thread_name
        self._work = work
        self._reset = reset
        self._gave_up = gave_up
        self.healthy = True
        self.restarts = 0
        self.last_error: str | None = None  # why it last died, for the status
        self.dead_for_good = False
        self._deaths: deque[float] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spawn()

    def unavailable(self) -> WorkerDied:
        """What a request gets while the worker is down."""
        why = f" for good ({self.last_error})" if self.dead_for_good else f" ({self.last_error}); it is restarting"
        return WorkerDied(f"the worker of this model died{why}")

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._guarded, name=self.thread_name, daemon=True)
        self._thread.start()

    def _guarded(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # everything: this thread is the only one that would see it
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # a closed loop: the daemon is gone, nobody waits
                self._loop.call_soon_threadsafe(self._died, exc)

    def _died(self, exc: BaseException) -> None:
        """On the loop: fail what it held, then restart after a backoff, or give up."""
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > WINDOW_S:
            self._deaths.popleft()
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        log.error("worker %s died: %s", self.thread_name, self.last_error, exc_info=exc)
        if self._thread is not None:
            self._thread.join(timeout=1)  # it is past its last line: this returns at once
        self.dead_for_good = len(self._deaths) > MAX_DEATHS and not self._closing
        self._reset(self.unavailable())
        if self._closing:
            return
        if self.dead_for_good:
            reason = f"its worker died {len(self._deaths)} times in {WINDOW_S:.0f} s (last: {self.last_error})"
            log.error("worker %s: giving up: %s", self.thread_name, reason)
            if self._gave_up is not None:
                self._gave_up(reason)
            return
        backoff = min(FIRST_BACKOFF_S * 2 ** (len(self._deaths) - 1), MAX_BACKOFF_S)
        assert self._loop is not None
        self._timer = self._loop.call_later(backoff, self._restart)

    def _restart(self) -> None:
        self._timer = None
        if self._closing:
            return
        self.restarts += 1
        log.warning("worker %s restarted (%d so far)", self.thread_name, self.restarts)
        self._spawn()
        self.healthy = True

    async def join(self) -> None:
        """Stop restarting and wait for the thread (the worker has asked it to stop)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def status(self) -> dict[str, object]:
        return {"healthy": self.healthy, "restarts": self.restarts, "last_error": self.last_error}
