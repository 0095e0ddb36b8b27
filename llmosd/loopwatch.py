"""How long the event loop was kept from running: the daemon's own check that no handler blocks it.

A task asks to wake every ``every_s`` and measures how late it woke. Lateness past ``limit_s`` means
something ran on the loop that long without yielding (blocking work that belongs in a thread, or native
code holding the GIL in another thread): it is logged as a warning with the time it lasted, counted, and
shown in /metrics. Unless, meanwhile, other processes kept nearly every core busy: then the loop waited
for a CPU, not for our code, and the late wake-up is counted apart (``starved``) at debug level. The
heartbeat's watchdog catches a loop that stops for seconds; this catches the tenths of a second a client
feels.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from llmosd.hardware.autotune import LoadMeter

log = logging.getLogger(__name__)


@dataclass
class LoopLag:
    limit_s: float = 0.1  # 0: not watched
    blocks: int = 0  # wake-ups later than the limit
    worst_s: float = 0.0  # the latest wake-up seen
    last_s: float = 0.0  # the lateness of the last wake-up
    starved: int = 0  # late wake-ups while other processes kept the cores busy (not counted as blocks)

    async def watch(self, every_s: float = 0.02) -> None:
        """Run until cancelled (a stage's task). Costs one timer and two small /proc reads every ``every_s``."""
        if self.limit_s <= 0:
            return
        loop = asyncio.get_running_loop()
        meter, cores = LoadMeter(), os.cpu_count() or 1
        while True:
            meter.restart()
            asked = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.last_s = late = max(0.0, loop.time() - asked)
            self.worst_s = max(self.worst_s, late)
            if late <= self.limit_s:
                continue
            others = meter.others_cores()
            if others > cores - 0.5:
                self.starved += 1
                log.debug("event loop woke %.0f ms late: other processes kept %.1f cores busy", late * 1000, others)
                continue
            self.blocks += 1
            log.warning("event loop blocked for %.0f ms (limit %.0f ms)", late * 1000, self.limit_s * 1000)
