"""Scale-out on Ray Serve, on a real local cluster the test starts on 127.0.0.1 (a head and one worker
process, one CPU each): ``llmosd ray deploy --autoscale`` adds a replica under load (the replicas on
Serve's proxy directly); ``--replicas 2`` (behind the ingress) runs two from the store, both answering
the same as a single daemon; a replica killed mid-load loses nothing (the ingress sends what it held to
the other), and Serve brings it back."""

from __future__ import annotations

import http.client
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
from typing import Any, NamedTuple

import numpy as np
import pytest

from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon, free_port, llmosd, store_with, unix_json

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
CLIENTS = 8  # sending while a replica is killed
LONG = 6  # generations running on both replicas then


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([*RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)


class Cluster(NamedTuple):
    address: str
    port: int  # Serve's HTTP proxy: the first deploy on a cluster fixes it for every later one


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
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
        yield Cluster(f"127.0.0.1:{port}", free_port())
    finally:
        ray_cli("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    """(status, headers (read case-blind: Serve's proxy sends them in lower case), body); status 0 for
    an answer cut off mid-body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
    except (http.client.IncompleteRead, ConnectionError) as exc:  # an answer cut off: a replica died under it
        return 0, {}, repr(exc).encode()


def vectors(raw: bytes) -> np.ndarray:
    return np.array([d["embedding"] for d in json.loads(raw)["data"]])


def replicas_seen(port: int, tries: int = 60) -> set[str]:
    seen = set()
    for i in range(tries):
        status, headers, _ = post(port, "/v1/embeddings", {"model": DEFAULT, "input": f"who answers {i}"})
        if status == 200:
            seen.add(headers["X-Llmosd-Replica"])
    return seen


def deploy(cluster: Cluster, state: Path, *args: str, port: int = 0) -> str:
    port = port or cluster.port
    r = llmosd(
        "ray",
        "deploy",
        *args,
        "--address",
        cluster.address,
        "--http-port",
        str(port),
        "--state-dir",
        str(state),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"http://127.0.0.1:{cluster.port}/v1" in r.stdout, r.stdout  # where the proxy really is
    return r.stdout


def test_autoscaling_adds_a_replica_under_load(cluster: Cluster, store_dir: Path, tmp_path: Path) -> None:
    """``--autoscale 1:2`` starts one replica; 16 clients keep more requests ongoing than one replica's
    target, and Serve's autoscaler adds the second, which answers too. With no ingress: the replicas
    take Serve's proxy themselves."""
    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    port = cluster.port
    scaling = ("--autoscale", "1:2", "--target-ongoing", "4", "--upscale-delay", "1")
    deploy(cluster, state, DEFAULT, *scaling, "--ingress-replicas", "0")
    assert len(replicas_seen(port, 10)) == 1
    seen: set[str] = set()
    statuses: list[int] = []
    stop = time.monotonic() + 120

    def client(_: int) -> None:
        while len(seen) < 2 and time.monotonic() < stop:
            status, headers, _raw = post(port, "/v1/embeddings", {"model": DEFAULT, "input": SENTENCES[:32]})
            statuses.append(status)
            if status == 200:
                seen.add(headers["X-Llmosd-Replica"])

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    print(f"second replica after {time.monotonic() - started:.1f} s, {len(statuses)} requests")
    assert len(seen) == 2, seen
    assert set(statuses) == {200}, sorted(set(statuses))  # scaling up loses nothing


def test_two_replicas_answer_like_one_daemon_and_a_killed_one_comes_back(
    cluster: Cluster, store_dir: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """Runs after the autoscaling test on the same cluster: the redeploy replaces its replicas, and a
    port other than the proxy's is reported, not silently assumed."""
    state = store_with(store_dir, tmp_path / "state", (DEFAULT, SMOLLM2))
    port = cluster.port
    out = deploy(cluster, state, DEFAULT, SMOLLM2, "--replicas", "2", port=free_port())
    assert "--http-host/--http-port are ignored" in out
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
    prompt = {"model": SMOLLM2, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    want = unix_json(daemon, "/v1/completions", prompt)["choices"][0]["text"]
    status, _, raw = post(port, "/v1/completions", prompt)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == want
    status, _, raw = post(port, "/v1/completions", prompt | {"stream": True})
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    status, _, raw = post(port, "/v1/chat/completions", {"model": SMOLLM2, "messages": []})
    assert status == 400 and "messages" in json.loads(raw)["error"]["message"]  # llmosd's own validation
    # Kill one replica's process while 8 clients keep sending embeddings and 6 long generations run on
    # both replicas (seconds each, so the victim is surely decoding some when it dies): what it held is
    # sent again by the ingress, to the other replica.
    victim = sorted(seen)[0]
    count = {"model": SMOLLM2, "prompt": "Count: 1, 2, 3,", "max_tokens": 256, "temperature": 0, "ignore_eos": True}

    def one(i: int) -> tuple[int, Any, bytes]:
        if i == 40:
            os.kill(int(victim.split("@")[0]), signal.SIGKILL)
        return post(port, "/v1/embeddings", {"model": DEFAULT, "input": texts})

    with ThreadPoolExecutor(LONG) as slow, ThreadPoolExecutor(CLIENTS) as pool:
        generations = [slow.submit(post, port, "/v1/completions", count) for _ in range(LONG)]
        answers = list(pool.map(one, range(200)))
        long = [g.result() for g in generations]
    failed = [a for a in answers + long if a[0] != 200]
    retried = [a for a in answers + long if a[0] == 200 and a[1].get("X-Llmosd-Retried")]
    print(f"killed {victim}: {len(failed)} of {200 + LONG} failed, {len(retried)} answered after a resend")
    assert not failed, [(a[0], a[2][:300]) for a in failed[:3]]
    assert any(a[1].get("X-Llmosd-Retried") for a in long)  # some were decoding on the victim
    for _, headers, _raw in answers + long:
        assert headers["X-Llmosd-Replica"] != victim or not headers.get("X-Llmosd-Retried")
    for _, _, raw in answers:
        np.testing.assert_allclose(vectors(raw), local, atol=1e-5)
    assert all(json.loads(raw)["usage"]["completion_tokens"] == 256 for _, _, raw in long)
    # Serve replaces it: two replicas answer again, one of them new
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas_seen(port, 20)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now, now
