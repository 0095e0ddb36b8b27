"""The daemon's life as a chain of stages: start in order, stop in reverse, errors collected."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmosd.daemon.chain import Chain, Stage
from llmosd.readiness import Phase, Readiness


class Recorded(Stage):
    def __init__(self, name: str, log: list[str], fail_start: bool = False, fail_stop: bool = False) -> None:
        self.name, self.log, self.fail_start, self.fail_stop = name, log, fail_start, fail_stop

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError(f"{self.name} cannot stop")

    def status(self) -> str:
        return f"{self.name} ok"


async def test_stages_start_in_order_and_stop_in_reverse_each_whatever_the_others_did() -> None:
    log: list[str] = []
    chain = Chain([Recorded("a", log), Recorded("b", log, fail_stop=True), Recorded("c", log, fail_stop=True)])
    await chain.start()
    assert chain.status() == "a ok; b ok; c ok"
    errors = await chain.stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert [str(e) for e in errors] == ["c cannot stop", "b cannot stop"]
    assert await chain.stop() == [] and log[-1] == "stop a"  # stopped once


async def test_a_stage_that_cannot_start_stops_the_ones_before_it() -> None:
    log: list[str] = []
    chain = Chain([Recorded("a", log), Recorded("b", log, fail_start=True), Recorded("c", log)])
    with pytest.raises(RuntimeError, match="b cannot start"):
        await chain.start()
    assert log == ["start a", "stop a"]


async def test_readiness_moves_through_explicit_phases_and_never_back_from_stopping() -> None:
    r = Readiness()
    assert (r.phase, r.ready, r.prepared, r.line) == (Phase.STARTING, False, False, "starting")
    r.move(Phase.EXPORTING, "first start: exporting m (int8)")
    assert not r.ready and not r.prepared
    r.move(Phase.DEGRADED, "serving 0 model(s) on -; default model(s) not loaded: m")
    assert r.prepared and not r.ready  # systemd hears READY=1, /readyz still says 503
    await r.wait_prepared()
    r.move(Phase.SERVING, "serving 1 model(s) on cpu")
    assert r.ready
    r.stop()
    r.move(Phase.SERVING, "serving 1 model(s) on cpu")  # a start-up task finishing during the drain
    assert r.phase is Phase.STOPPING and not r.ready and r.line == "stopping: draining in-flight requests"


# A real daemon in a child process whose pool fails to close (a worker thread that will not join, say):
# the stages after and before it still stop, the socket file goes, "stopped" is logged, the exit is 1.
FAILING_CLOSE = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from llmosd.config import load_config
    from llmosd.daemon import serve
    from llmosd.scheduler import ModelPool

    async def refuse(self):
        raise RuntimeError("the pool would not close")

    ModelPool.close = refuse

    async def main():
        cfg = load_config({"state_dir": sys.argv[1], "socket": sys.argv[2], "port": 0, "seed_defaults": False}, {})
        task = asyncio.create_task(serve(cfg))
        while not os.path.exists(sys.argv[2]):
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        print("exit", await task)

    asyncio.run(main())
""")


def test_a_stage_failing_to_stop_still_removes_the_socket_and_logs_stopped(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    r = subprocess.run(
        [sys.executable, "-c", FAILING_CLOSE, str(tmp_path / "state"), str(sock)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["exit", "1"]
    assert "stopping pool failed: the pool would not close" in r.stderr
    assert "stopped (1 stage(s) failed to stop)" in r.stderr
    assert not sock.exists()


async def test_the_loop_watch_counts_a_block_past_its_limit_and_not_the_work_that_yields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's loop watch on a real event loop: 40 ms of work that yields every millisecond is no
    block; 250 ms of work that does not yield is one, logged with how long it lasted."""
    import asyncio
    import logging
    import time

    from llmosd.daemon.chain import cancel
    from llmosd.loopwatch import LoopLag

    lag = LoopLag(limit_s=0.1)
    watch = asyncio.create_task(lag.watch(every_s=0.01))
    await asyncio.sleep(0.05)
    for _ in range(40):
        time.sleep(0.001)
        await asyncio.sleep(0)
    assert lag.blocks == 0
    with caplog.at_level(logging.WARNING, logger="llmosd.loopwatch"):
        # on the loop, as a handler computing without yielding would: busy, so that the machine's other
        # load (a build, a calibration) can use one core at most and the watch sees our block, not them
        end = time.perf_counter() + 0.25
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0.05)
    assert lag.blocks == 1 and 0.2 < lag.worst_s < 1.0, lag
    assert "event loop blocked for" in caplog.text and "(limit 100 ms)" in caplog.text
    # Other processes keeping every core busy: a late wake-up is the box's, counted apart, not a block.
    cores = os.cpu_count() or 1
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        await asyncio.sleep(0.5)  # the spinners are up
        time.sleep(0.25)
        await asyncio.sleep(0.05)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    await cancel(watch)
    assert lag.blocks == 1 and lag.starved >= 1, lag
    assert await asyncio.wait_for(LoopLag(limit_s=0).watch(), 1) is None  # 0: not watched, returns at once
