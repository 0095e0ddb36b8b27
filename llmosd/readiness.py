"""Where the daemon is in its life, as explicit states: what /readyz, /api/status and systemd's STATUS say.

The daemon's stages move it; the API, the heartbeat and the mDNS advertiser read it. The line is for
people; code decides on the phase.
"""

from __future__ import annotations

import asyncio
import enum


class Phase(enum.Enum):
    STARTING = "starting"
    IMPORTING = "importing"  # first start: the default models from the seed archive
    EXPORTING = "exporting"  # first start: a default model exported from its package (minutes)
    LOADING = "loading"
    SERVING = "serving"  # ready: every expected model loaded
    DEGRADED = "degraded"  # prepared, serving what loaded, but an expected model did not: not ready
    STOPPING = "stopping"


PREPARED = frozenset({Phase.SERVING, Phase.DEGRADED})


class Readiness:
    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._line = "starting"
        self._prepared = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def line(self) -> str:
        return self._line

    @property
    def ready(self) -> bool:
        return self._phase is Phase.SERVING

    @property
    def prepared(self) -> bool:
        """The start-up work is over (the models loaded, or found missing): systemd hears READY=1."""
        return self._prepared.is_set()

    async def wait_prepared(self) -> None:
        await self._prepared.wait()

    async def changed(self, timeout: float) -> None:
        """Until the phase or line moves, or ``timeout`` seconds: systemd's STATUS follows each step of a
        start-up that takes less than a heartbeat."""
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation that arrives as
        # the event is set (gh-86296), and a heartbeat that outlives its stop pings forever.
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()
        self._changed.clear()

    def move(self, phase: Phase, line: str) -> None:
        """Nothing moves a stopping daemon back: a start-up task finishing during the drain must not
        make /readyz say 200 again."""
        if self._phase is Phase.STOPPING:
            return
        self._phase, self._line = phase, line
        self._changed.set()
        if phase in PREPARED:
            self._prepared.set()

    def stop(self) -> None:
        self.move(Phase.STOPPING, "stopping: draining in-flight requests")
