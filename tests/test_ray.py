"""Scale-out on Ray Serve, on a real local cluster the test starts on 127.0.0.1 (a head and one worker
process, one CPU each): ``llmosd ray deploy`` runs two replicas from the store; both answer, the same
as a single daemon; a replica killed mid-load loses only what it held, and Serve brings it back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon, free_port, llmosd, store_with, unix_json

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
MAX_ONGOING = 64  # llmosd.ray.replica's max_ongoing_requests: what one replica may hold


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([*RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("ray.serve", reason="Ray Serve is the ray extra (CI installs it with dev)")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    head = ray_cli(
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "1",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
    )
    assert head.returncode == 0, head.stderr[-3000:]
    try:
        worker = ray_cli("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1")
        assert worker.returncode == 0, worker.stderr[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        ray_cli("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    """(status, headers (read case-blind: Serve's proxy sends them in lower case), body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def vectors(raw: bytes) -> np.ndarray:
    return np.array([d["embedding"] for d in json.loads(raw)["data"]])


def replicas_seen(port: int, tries: int = 60) -> set[str]:
    seen = set()
    for i in range(tries):
        status, headers, _ = post(port, "/v1/embeddings", {"model": DEFAULT, "input": f"who answers {i}"})
        if status == 200:
            seen.add(headers["X-Llmosd-Replica"])
    return seen


def test_two_replicas_answer_like_one_daemon_and_a_killed_one_comes_back(
    cluster: str, store_dir: Path, daemon: Daemon, tmp_path: Path
) -> None:
    state = store_with(store_dir, tmp_path / "state", (DEFAULT, SMOLLM2))
    port = free_port()
    r = llmosd(
        "ray",
        "deploy",
        DEFAULT,
        SMOLLM2,
        "--address",
        cluster,
        "--replicas",
        "2",
        "--http-port",
        str(port),
        "--state-dir",
        str(state),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in r.stdout
    seen = replicas_seen(port)
    assert len(seen) == 2, seen
    # the same answers as a single daemon serving the same store
    texts = SENTENCES[:8]
    status, _, raw = post(port, "/v1/embeddings", {"model": DEFAULT, "input": texts})
    assert status == 200
    local = np.array(
        [d["embedding"] for d in unix_json(daemon, "/v1/embeddings", {"model": DEFAULT, "input": texts})["data"]]
    )
    np.testing.assert_allclose(vectors(raw), local, atol=1e-5)
    chat = {
        "model": SMOLLM2,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    want = unix_json(daemon, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    status, headers, raw = post(port, "/v1/chat/completions", chat | {"stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want
    status, _, raw = post(port, "/v1/chat/completions", {"model": SMOLLM2, "messages": []})
    assert status == 400 and "messages" in json.loads(raw)["error"]["message"]  # llmosd's own validation
    # kill one replica's process while 8 clients keep sending
    victim = sorted(seen)[0]
    answers: list[tuple[int, bytes]] = []

    def one(i: int) -> tuple[int, bytes]:
        if i == 40:
            os.kill(int(victim.split("@")[0]), signal.SIGKILL)
        status, _, raw = post(port, "/v1/embeddings", {"model": DEFAULT, "input": texts})
        return status, raw

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(200)))
    failed = [a for a in answers if a[0] != 200]
    assert len(failed) <= MAX_ONGOING, failed[:3]  # at most what the dead replica held
    for status, raw in answers:
        if status == 200:
            np.testing.assert_allclose(vectors(raw), local, atol=1e-5)
    # Serve replaces it: two replicas answer again, one of them new
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas_seen(port, 20)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now, now
