"""The daemon's upkeep of its store and its downloads: stale tmp/ folders swept, the bandwidth cap."""

from __future__ import annotations

import os
import time
from pathlib import Path

from llmosd.registry.throttle import Throttle
from llmosd.store import ModelStore, sweep_tmp


def test_only_folders_nothing_touched_for_a_week_are_swept(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old, fresh, mixed = (store.tmp / n for n in ("pull-old", "export-running", "pull-resumable"))
    for d in (old, fresh, mixed):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "part").write_bytes(b"x")
    week = 7 * 24 * 3600
    now = time.time()
    for d in (old, mixed):
        for p in (d, d / "sub", d / "sub" / "part"):
            os.utime(p, (now - week - 60, now - week - 60))
    os.utime(mixed / "sub" / "part", (now - 60, now - 60))  # written a minute ago: someone owns it
    assert sweep_tmp(store, now=now) == ["pull-old"]
    assert sorted(p.name for p in store.tmp.iterdir()) == ["export-running", "pull-resumable"]


async def test_the_throttle_keeps_the_average_rate() -> None:
    clock = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    throttle = Throttle(1_000_000, clock=lambda: clock[0], sleep=sleep)
    for _ in range(30):  # 3 MB in 100 kB chunks, arriving instantly
        await throttle.take(100_000)
    # the first second's worth passes as a burst; the other 2 MB wait: 2 s in all
    assert abs(sum(slept) - 2.0) < 1e-9 and abs(clock[0] - 2.0) < 1e-9
    unlimited = Throttle(0, clock=lambda: clock[0], sleep=sleep)
    await unlimited.take(10**9)
    assert abs(sum(slept) - 2.0) < 1e-9
