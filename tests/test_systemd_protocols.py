"""systemd's protocols without systemd: a datagram NOTIFY_SOCKET that receives READY/STATUS/WATCHDOG/
RELOADING/STOPPING in order from a real daemon, `systemd-socket-activate` passing it its listening fds,
the journal's native wire format, and what a reload may change live."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmosd.config import load_config
from llmosd.logs import MODEL, REQUEST_ID, ContextFilter
from llmosd.reload import reconcile
from llmosd.systemd import JournalHandler, journal_stream, listen_fds
from llmosd.systemd.journal import encode
from tests.conftest import DEFAULT, free_port, start_daemon, store_with, unix_json

BASE_ENV = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"}


class NotifySocket:
    """A datagram socket standing in for systemd's: every message the daemon sends, with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def until(self, key: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = len(self.messages)
        while time.monotonic() < deadline:
            self.read(0.2)
            for _, m in self.messages[seen:]:
                if key in m:
                    return m
        raise AssertionError(f"no {key} within {timeout} s: {self.messages[-10:]}")

    def keys(self) -> list[str]:
        """The message kinds in order, watchdog pings and repeated statuses folded."""
        out: list[str] = []
        for _, m in self.messages:
            kind = next((k for k in ("READY", "RELOADING", "STOPPING", "WATCHDOG") if k in m), "STATUS")
            if not out or out[-1] != kind:
                out.append(kind)
        return out


@pytest.mark.blocks_loop
def test_the_daemon_tells_the_notify_socket_ready_status_watchdog_reload_and_stop(
    store_dir: Path, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    config = tmp_path / "config.toml"
    config.write_text('log_level = "info"\nmax_queue = 1024\n')
    env = {
        **BASE_ENV,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "2000000",
        "LLMOSD_DEBUG_API": "true",
    }
    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    d = start_daemon(state, tmp_path, "--config", str(config), env=env)
    try:
        ready = notify.until("READY")
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving 1 model(s) on cpu")
        statuses = [m["STATUS"] for _, m in notify.messages if "STATUS" in m]
        assert any(s.startswith(f"loading {DEFAULT}") for s in statuses)  # said before READY
        assert unix_json(d, "/readyz")["status"] == "ready"
        notify.read(1.5)
        pings = [t for t, m in notify.messages if "WATCHDOG" in m]
        assert len(pings) >= 2 and max(b - a for a, b in itertools.pairwise(pings)) < 1.0

        # a blocked event loop sends no ping: systemd's watchdog (WatchdogSec=) would fire
        before = len(notify.messages)
        unix_json(d, "/api/debug/block-loop", {"seconds": 2.5})
        notify.read(0.8)
        pings = [t for t, m in notify.messages[before - 1 :] if "WATCHDOG" in m]
        assert max(b - a for a, b in itertools.pairwise(pings)) >= 2.4
        # the daemon's own loop watch saw it, and a block of 0.3 s too: logged with how long, counted
        unix_json(d, "/api/debug/block-loop", {"seconds": 0.3})
        with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
            families = text_string_to_metric_families(r.read().decode())
            metrics = {s.name: s.value for f in families for s in f.samples}
        blocks = [int(ms) for ms in re.findall(r"event loop blocked for (\d+) ms", d.log.read_text())]
        assert any(2300 < b < 4000 for b in blocks), blocks
        # The 0.3 s block is a block, or, where the loop watch saw other processes keep the cores busy
        # meanwhile (CI once), a starved wake-up (logged at debug level): counted either way.
        starved = metrics["llmosd_event_loop_starved_total"]
        assert 250 < blocks[-1] < 1000 or starved >= 1, (blocks, starved)
        assert metrics["llmosd_event_loop_blocks_total"] == len(blocks)
        assert 2.3 < metrics["llmosd_event_loop_lag_max_seconds"] < 4.0

        config.write_text('log_level = "debug"\nmax_queue = 7\nmax_inputs = 4\nhost = "0.0.0.0"\n')
        d.proc.send_signal(signal.SIGHUP)
        reloaded = notify.until("READY")
        assert any("RELOADING" in m and "MONOTONIC_USEC" in m for _, m in notify.messages)
        assert reloaded["STATUS"].startswith("serving 1 model(s)")
        with pytest.raises(urllib.error.HTTPError) as err:  # max_inputs 4 is live: 5 inputs are refused
            body = json.dumps({"model": DEFAULT, "input": ["x"] * 5}).encode()
            urllib.request.urlopen(urllib.request.Request(d.url + "/v1/embeddings", body), timeout=30)
        assert err.value.code == 400 and "too many inputs: 5 > 4" in err.value.read().decode()
        d.proc.send_signal(signal.SIGTERM)
        stopping = notify.until("STOPPING")
        assert stopping["STATUS"].startswith("stopping")
        assert d.proc.wait(30) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    kinds = notify.keys()
    assert kinds.index("READY") < kinds.index("RELOADING") < len(kinds) - 1 - kinds[::-1].index("READY")
    assert kinds[-1] == "STOPPING" or kinds[-2:] == ["STOPPING", "WATCHDOG"]
    log = d.log.read_text()
    assert f"sd_notify to {notify.path} (built-in), watchdog on" in log  # this venv has no systemd-python
    assert "log_level, max_queue, max_inputs" in log
    assert "host changed but take effect only at a restart" in log


def test_systemd_socket_activate_passes_the_listening_fds(store_dir: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("systemd-socket-activate is missing (Debian's systemd package has it)")
        pytest.skip("systemd-socket-activate is not installed")
    sock, port = tmp_path / "activated.sock", free_port()
    cmd = [
        tool,
        "-l",
        str(sock),
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=llmosd:llmosd",
        *(f"-E{k}={v}" for k, v in BASE_ENV.items()),
        sys.executable,
        "-m",
        "llmosd",
        "serve",
        "--state-dir",
        str(tmp_path / "state"),
        "--socket",
        str(tmp_path / "never-bound.sock"),
        "--port",
        "1",  # would fail to bind: only the passed fds can serve
    ]
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": "."})
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the first request starts the daemon (activation), then it answers on both sockets
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as r:
            assert r.status == 200
        import http.client

        conn = http.client.HTTPConnection("localhost", timeout=30)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(sock))
        conn.request("GET", "/api/status")
        status = json.loads(conn.getresponse().read())
        assert sorted(status["listeners"]) == sorted([f"unix:{sock}", f"tcp:127.0.0.1:{port}"])
        assert not (tmp_path / "never-bound.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert sock.exists()  # the socket belongs to whoever passed it (systemd keeps it for the next start)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "(sockets from systemd)" in log.read_text()


def test_listen_fds_takes_only_what_is_passed_to_this_process() -> None:
    assert listen_fds({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}) == []
    env = {"LISTEN_PID": "junk", "LISTEN_FDS": "1"}
    assert listen_fds(env) == []
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_fds(env) == [] and env == {}  # read once: children do not see them


def test_the_journal_wire_format_and_fields(tmp_path: Path) -> None:
    assert encode({"A": "one", "B": "two\nlines"}) == b"A=one\nB\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    handler = JournalHandler(path=str(tmp_path / "journal"))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("llmosd.test")
    logger.addHandler(handler)
    try:
        token_r, token_m = REQUEST_ID.set("req-42"), MODEL.set("minilm")
        logger.warning("slow batch: %d ms", 812)
        REQUEST_ID.reset(token_r)
        MODEL.reset(token_m)
        data = journal.recv(65536)
    finally:
        logger.removeHandler(handler)
        handler.close()
        journal.close()
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    assert fields["MESSAGE"] == "slow batch: 812 ms" and fields["PRIORITY"] == "4"
    assert fields["MODEL"] == "minilm" and fields["REQUEST_ID"] == "req-42"
    assert fields["SYSLOG_IDENTIFIER"] == "llmosd" and fields["CODE_FUNC"] == "test_the_journal_wire_format_and_fields"


def test_journal_stream_is_recognised_only_for_our_stderr(tmp_path: Path) -> None:
    st = os.fstat(2)
    assert journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not journal_stream({})


def test_a_reload_applies_live_values_and_keeps_the_rest(tmp_path: Path) -> None:
    running = load_config({"state_dir": str(tmp_path)}, environ={})
    new = replace(running, max_queue=7, log_level="debug", port=9999, subscriptions="r.local/m:stable")
    change = reconcile(running, new)
    assert set(change.applied) == {"max_queue", "log_level", "subscriptions"}
    assert change.need_restart == ("port",)
    assert change.config.max_queue == 7 and change.config.port == running.port
    assert reconcile(running, running).applied == ()


async def test_the_heartbeat_asks_for_time_while_exporting_and_says_what_the_sync_does(tmp_path: Path) -> None:
    import asyncio

    from llmosd.daemon import heartbeat
    from llmosd.readiness import Phase, Readiness
    from llmosd.systemd import Notifier

    notify = NotifySocket(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})  # pings every 0.1 s

    readiness, syncing = Readiness(), [""]
    readiness.move(Phase.EXPORTING, "first start: exporting all-minilm-l6-v2 (int8)")
    beating = asyncio.create_task(heartbeat(readiness, notifier, lambda: syncing[0]))
    await asyncio.to_thread(notify.read, 0.35)  # read as systemd does: its queue holds 10
    syncing[0] = "syncing r.local/m:stable: pulling"
    readiness.move(Phase.SERVING, "serving 1 model(s) on cpu")
    await asyncio.to_thread(notify.read, 0.35)  # read as systemd does: its queue holds 10
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)
    messages = [m for _, m in notify.messages]
    extend = [m for m in messages if "EXTEND_TIMEOUT_USEC" in m]
    assert len(extend) == 1 and extend[0]["EXTEND_TIMEOUT_USEC"] == "60000000"  # once per 10 s at most
    assert next(m for m in messages if "STATUS" in m)["STATUS"] == "first start: exporting all-minilm-l6-v2 (int8)"
    ready = next(m for m in messages if "READY" in m)
    assert ready["STATUS"] == "serving 1 model(s) on cpu; syncing r.local/m:stable: pulling"
    assert sum("WATCHDOG" in m for m in messages) >= 5
