"""How long the event loop was kept from running: the daemon's own check that no handler blocks it.

A task asks to wake every ``every_s`` and measures how late it woke. Lateness past ``limit_s`` means
something ran on the loop that long without yielding (blocking work that belongs in a thread): it is
logged as a warning with the time it lasted, counted, and shown in /metrics. The heartbeat's watchdog
catches a loop that stops for seconds; this catches the tenths of a second a client feels.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class LoopLag:
    limit_s: float = 0.1  # 0: not watched
    blocks: int = 0  # wake-ups later than the limit
    worst_s: float = 0.0  # the latest wake-up seen
    last_s: float = 0.0  # the lateness of the last wake-up

    async def watch(self, every_s: float = 0.02) -> None:
        """Run until cancelled (a stage's task). Costs one timer every ``every_s``."""
        if self.limit_s <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.last_s = late = max(0.0, loop.time() - asked)
            self.worst_s = max(self.worst_s, late)
            if late > self.limit_s:
                self.blocks += 1
                log.warning("event loop blocked for %.0f ms (limit %.0f ms)", late * 1000, self.limit_s * 1000)
