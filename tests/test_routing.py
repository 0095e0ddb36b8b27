"""Hybrid routing with real servers: two daemons on a LAN of two network namespaces (one holds SmolLM2 and
MiniLM, the other MiniLM only), and llama.cpp's own llama-server on loopback standing in for a cloud
upstream, spoken to through the official openai SDK pointed at llmosd."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon, free_port, smollm2_gguf, start_daemon, store_with
from tests.netns import Lan

pytestmark = pytest.mark.slow
ENV = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_MAX_CONNECTIONS_PER_CLIENT": "16"}
CHAT = {"model": SMOLLM2, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12}
SITE_TOKEN = "site-token-that-must-never-be-printed-0123456789"


def call(d: Daemon, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, headers, JSON or text) over the daemon's Unix socket."""
    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(d.socket))
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json"} | (headers or {})
    conn.request("POST" if body is not None else "GET", path, body=data, headers=sent)
    r = conn.getresponse()
    raw = r.read().decode()
    try:
        return r.status, r.headers, json.loads(raw)
    except ValueError:
        return r.status, r.headers, raw


def upstream(d: Daemon, route: str) -> dict[str, Any] | None:
    return next((u for u in call(d, "/api/status")[2]["routing"]["upstreams"] if u["route"] == route), None)


def wait_up(d: Daemon, route: str, up: bool = True, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (u := upstream(d, route)) is not None and u["up"] == up:
            return
        time.sleep(0.25)
    raise AssertionError(f"{route} not {'up' if up else 'down'} within {timeout} s: {upstream(d, route)}")


def streamed_text(raw: str) -> str:
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def boxes(lan: Lan, store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    """box-a (SmolLM2, MiniLM; its MiniLM prefers box-b) and box-b (MiniLM, a queue of 4; prefers local,
    routes to the LAN). A site token both hold; box-b names it per peer in its lan_token_file."""
    root = tmp_path_factory.mktemp("routing")
    states = (
        store_with(store_dir, root / "a-state", (SMOLLM2, DEFAULT)),
        store_with(store_dir, root / "b-state", (DEFAULT,)),
    )
    for state in states:
        (state / "token").write_text(SITE_TOKEN + "\n")
        (state / "token").chmod(0o600)
    tokens = root / "lan-tokens"
    tokens.write_text(f"# the token each peer takes\nbox-a {SITE_TOKEN}\n")
    (root / "a").mkdir()
    (root / "b").mkdir()
    lan_flags = ("--host", "0.0.0.0", "--lan-upstreams", "true")
    a = start_daemon(
        states[0],
        root / "a",
        *lan_flags,
        "--route",
        f"local,{DEFAULT}=prefer-remote",
        env=ENV | {"LLMOSD_MDNS_NAME": "box-a"},
        prefix=lan.run(lan.a),
    )
    b = start_daemon(
        states[1],
        root / "b",
        *lan_flags,
        "--route",
        "prefer-local",
        "--lan-token-file",
        str(tokens),
        env=ENV | {"LLMOSD_MDNS_NAME": "box-b", "LLMOSD_MAX_QUEUE": "4"},
        prefix=lan.run(lan.b),
    )
    try:
        wait_up(b, "lan:box-a")
        wait_up(a, "lan:box-b")
        yield a, b
    finally:
        assert b.stop() == 0
        assert a.stop() == 0


def test_a_chat_the_box_lacks_is_answered_by_its_lan_peer(boxes: tuple[Daemon, Daemon]) -> None:
    a, b = boxes
    status, _, direct = call(a, "/v1/chat/completions", CHAT | {"temperature": 0})
    assert status == 200
    status, headers, routed = call(b, "/v1/chat/completions", CHAT | {"temperature": 0})
    assert status == 200, routed
    assert headers["X-Llmosd-Route"] == "lan:box-a"
    assert routed["choices"][0]["message"] == direct["choices"][0]["message"]
    streamed = CHAT | {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = call(b, "/v1/chat/completions", streamed)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Llmosd-Route"] == "lan:box-a"
    assert streamed_text(raw) == direct["choices"][0]["message"]["content"]
    assert raw.rstrip().endswith("data: [DONE]")
    # what the peer generated for box-b's clients, as its answers' usage says (it counts against a
    # client's rate_limit_tokens_per_s as local tokens do)
    tokens = routed["usage"]["completion_tokens"]
    assert tokens > 0
    labels = f'model="{SMOLLM2}",route="lan:box-a"'
    assert metric_reaches(b, "llmosd_routed_generated_tokens_total", labels, 2 * tokens) == 2 * tokens
    # an error of the peer's comes back in llmosd's shape, the peer named
    status, headers, error = call(b, "/v1/chat/completions", CHAT | {"max_tokens": -1})
    assert status == 400 and headers["X-Llmosd-Route"] == "lan:box-a"
    assert error["error"]["message"].startswith("lan:box-a: ") and "max_tokens" in error["error"]["message"]
    # what is reachable, and how
    cards = {c["id"]: c for c in call(b, "/v1/models?reachable=1")[2]["data"]}
    assert cards[SMOLLM2]["route"] == "lan:box-a" and cards[SMOLLM2]["routes"] == ["lan:box-a"]
    assert cards[DEFAULT]["route"] == "local" and cards[DEFAULT]["routes"] == ["local", "lan:box-a"]
    assert SMOLLM2 not in {c["id"] for c in call(b, "/v1/models")[2]["data"]}  # unless asked
    assert "routing: smollm2-135m-instruct to lan:box-a (not in this box's store)" in b.log.read_text()


def test_a_full_local_queue_overflows_to_the_peer_and_nothing_runs_twice(boxes: tuple[Daemon, Daemon]) -> None:
    a, b = boxes
    before = metric(a, "llmosd_requests_total", f'route="/v1/embeddings",model="{DEFAULT}",status="200"')
    body = {"model": DEFAULT, "input": SENTENCES[:16]}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: call(b, "/v1/embeddings", body), range(24)))
    assert [s for s, _, _ in answers] == [200] * 24, [r for s, _, r in answers if s != 200][:2]
    routes = [h["X-Llmosd-Route"] for _, h, _ in answers]
    assert "local" in routes and "lan:box-a" in routes, routes
    assert metric(b, "llmosd_rejected_requests_total", f'model="{DEFAULT}"') >= routes.count("lan:box-a")
    vectors = {
        r: np.array([d["embedding"] for d in ans["data"]]) for (_, _, ans), r in zip(answers, routes, strict=True)
    }
    np.testing.assert_allclose(vectors["local"], vectors["lan:box-a"], atol=1e-5)  # one model, two boxes
    # box-a answered each overflow itself (a forwarded request is not routed again, though its MiniLM
    # prefers box-b), and exactly once
    after = metric(a, "llmosd_requests_total", f'route="/v1/embeddings",model="{DEFAULT}",status="200"')
    assert after - before == routes.count("lan:box-a")
    assert metric(a, "llmosd_routed_requests_total", f'model="{DEFAULT}",route="lan:box-b"') == 0
    # box-a's own clients: its policy sends MiniLM to box-b, over connections it keeps (box-b lets one
    # address hold 16: a connection per request would be refused from the 17th on)
    for i in range(24):
        status, headers, _ = call(a, "/v1/embeddings", {"model": DEFAULT, "input": f"hello {i}"})
        assert status == 200 and headers["X-Llmosd-Route"] == "lan:box-b"
    assert metric(a, "llmosd_routed_requests_total", f'model="{DEFAULT}",route="lan:box-b"') == 24


def test_no_secret_reaches_logs_status_or_metrics(boxes: tuple[Daemon, Daemon]) -> None:
    b = boxes[1]
    for d in boxes:
        _, _, status = call(d, "/api/status")
        _, _, metrics = call(d, "/metrics")
        for text in (d.log.read_text(), json.dumps(status), metrics):
            assert SITE_TOKEN not in text
    assert upstream(b, "lan:box-a")["credentials"] is True


def metric_reaches(d: Daemon, name: str, labels: str, want: float) -> float:
    """The metric once it shows ``want`` (an answer's tail is counted just after the client has it), or
    its value after 5 s."""
    deadline = time.monotonic() + 5
    while (got := metric(d, name, labels)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def metric(d: Daemon, name: str, labels: str) -> float:
    _, _, text = call(d, "/metrics")
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class LlamaServer:
    binary: Path
    port: int
    key: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [str(self.binary), "-m", str(smollm2_gguf()), "--alias", "cloud-smollm", "--api-key", self.key]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "-t", "2", "-c", "2048", "-np", "2", "--no-webui"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "llama-server exited"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("llama-server did not become healthy")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def cloud(
    llama_server_bin: Path, store_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LlamaServer, Daemon]]:
    root = tmp_path_factory.mktemp("cloud")
    server = LlamaServer(llama_server_bin, free_port(), "sk-cloud-key-that-must-never-be-printed")
    server.start()
    key = root / "key"
    key.write_text(server.key + "\n")
    key.chmod(0o600)
    (root / "d").mkdir()
    d = start_daemon(
        store_with(store_dir, root / "state", (DEFAULT,)),
        root / "d",
        "--route",
        "prefer-local",
        "--openai-upstream-url",
        f"http://127.0.0.1:{server.port}/v1",
        "--openai-upstream-key-file",
        str(key),
        "--openai-upstream-name",
        "llama",
        env=ENV,
    )
    try:
        wait_up(d, "upstream:llama")
        yield server, d
    finally:
        assert d.stop() == 0
        server.kill()


def test_llama_server_as_a_cloud_upstream_through_the_openai_sdk(cloud: tuple[LlamaServer, Daemon]) -> None:
    from openai import BadRequestError, OpenAI

    server, d = cloud
    asked = {"model": "cloud-smollm", "messages": CHAT["messages"], "max_tokens": 12, "temperature": 0}
    direct = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=server.key)
    expected = direct.chat.completions.create(**asked).choices[0].message.content
    via = OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="loopback-needs-none")
    labels = 'model="cloud-smollm",route="upstream:llama"'
    before = metric(d, "llmosd_routed_generated_tokens_total", labels)
    raw = via.chat.completions.with_raw_response.create(**asked)
    assert raw.headers["x-llmosd-route"] == "upstream:llama"
    assert raw.parse().choices[0].message.content == expected
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens > 0
    want = before + usage.completion_tokens
    assert metric_reaches(d, "llmosd_routed_generated_tokens_total", labels, want) == want
    before += usage.completion_tokens
    with via.chat.completions.with_streaming_response.create(**asked, stream=True) as stream:
        assert stream.headers["x-llmosd-route"] == "upstream:llama"
        chunks = [c for c in stream.parse() if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    # no usage asked for: the stream is counted an event with text a token, as the client saw them
    want = before + sum(1 for c in chunks if c.choices[0].delta.content)
    assert metric_reaches(d, "llmosd_routed_generated_tokens_total", labels, want) == want
    with pytest.raises(BadRequestError) as refused:  # llama-server's 400, in llmosd's shape, named
        via.chat.completions.create(model="cloud-smollm", messages=[{"role": "user"}])  # type: ignore[list-item]
    assert refused.value.response.headers["x-llmosd-route"] == "upstream:llama"
    error = refused.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("upstream:llama: ")
    # the box's own model stays local
    embedded = via.embeddings.with_raw_response.create(model=DEFAULT, input="hello")
    assert embedded.headers["x-llmosd-route"] == "local"
    _, _, status = call(d, "/api/status")
    for text in (d.log.read_text(), json.dumps(status), call(d, "/metrics")[2]):
        assert server.key not in text


def test_a_killed_upstream_is_skipped_and_comes_back(cloud: tuple[LlamaServer, Daemon]) -> None:
    server, d = cloud
    asked = {"model": "cloud-smollm", "messages": CHAT["messages"], "max_tokens": 4}
    assert call(d, "/v1/chat/completions", asked)[0] == 200
    server.kill()
    status, headers, error = call(d, "/v1/chat/completions", asked)
    assert status == 503 and "upstream:llama" in error["error"]["message"], error
    assert upstream(d, "upstream:llama")["up"] is False
    status, _, error = call(d, "/v1/chat/completions", asked)  # skipped now: no connection is tried
    assert status == 503 and "upstreams that serve it are down: upstream:llama" in error["error"]["message"]
    assert call(d, "/v1/embeddings", {"model": DEFAULT, "input": "still here"})[0] == 200  # local goes on
    server.start()
    wait_up(d, "upstream:llama", timeout=30)  # the backoff's probes find it again
    status, headers, _ = call(d, "/v1/chat/completions", asked)
    assert status == 200 and headers["X-Llmosd-Route"] == "upstream:llama"
    assert "routing: upstream:llama is up" in d.log.read_text()
