"""What a hostile client found (issue 12), each input sent exactly as found to a real daemon: a clear 4xx,
the daemon still serves, and /metrics still parses."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT, SMOLLM2, Daemon, start_daemon, store_with

DEEP = b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
INFER = f"/v2/models/{DEFAULT}/infer"


def tensor(data: object, **extra: object) -> dict[str, object]:
    return {"name": "input_ids", "datatype": "INT64", "shape": [1], "data": data, **extra}


async def still_serving(s: aiohttp.ClientSession) -> None:
    async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "still serving"}) as r:
        assert r.status == 200, await r.text()
    async with s.get("/metrics") as r:
        assert r.status == 200
        families = {f.name for f in text_string_to_metric_families(await r.text())}
    assert "llmosd_requests" in families and "llmosd_model_ready" in families


async def post_raw(s: aiohttp.ClientSession, path: str, body: bytes, **headers: str) -> tuple[int, object]:
    async with s.post(path, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, json.loads(await r.read())


async def test_an_unencodable_model_name_does_not_break_metrics(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        status, body = await post_raw(s, "/v1/embeddings", b'{"model":"\\ud800","input":"x"}')
        assert status == 400 and "surrogate" in body["error"]["message"]  # type: ignore[index]
        # A name the box does not serve is not a label either: no series per invented name.
        async with s.post("/v1/embeddings", json={"model": "invented-name-123", "input": "x"}) as r:
            assert r.status == 404
        async with s.get("/metrics") as r:
            text = await r.text()
        assert "invented-name-123" not in text
        await still_serving(s)


JSON_ROUTES = [
    "/v1/embeddings",
    "/v1/classify",
    "/v1/completions",
    "/v1/chat/completions",
    INFER,
    f"/api/models/{DEFAULT}/activate",
    "/api/models/pull",
]


@pytest.mark.parametrize("path", JSON_ROUTES)
async def test_deeply_nested_json_is_a_400(daemon: Daemon, path: str) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        status, body = await post_raw(s, path, DEEP)
        assert status == 400, body
        message = body["error"] if path.startswith("/v2") else body["error"]["message"]  # type: ignore[index]
        assert "nested deeper than" in message
        await still_serving(s)


LONE_SURROGATES = [
    ("/v1/embeddings", b'{"model": "%s", "input": "a\\ud800b"}' % DEFAULT.encode()),
    (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % SMOLLM2.encode(),
    ),
    ("/v1/completions", b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % SMOLLM2.encode()),
    ("/v1/embeddings", b'{"model": "%s", "input": ["ok", "\\udfff"]}' % DEFAULT.encode()),
]


@pytest.mark.parametrize(("path", "body"), LONE_SURROGATES)
async def test_a_lone_surrogate_in_text_is_a_400(daemon: Daemon, path: str, body: bytes) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        status, answer = await post_raw(s, path, body)
        assert status == 400 and "surrogate" in answer["error"]["message"], answer  # type: ignore[index]
        await still_serving(s)


OIP_CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("int64-past-range", json.dumps({"inputs": [tensor([2**70])]}).encode(), {}),
    ("int64-1e400", b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": [1e400]}]}', {}),
    ("tensor-parameters-list", json.dumps({"inputs": [tensor([1], parameters=[1])]}).encode(), {}),
    ("request-parameters-list", json.dumps({"inputs": [tensor([1])], "parameters": [1]}).encode(), {}),
    (
        "output-parameters-list",
        json.dumps({"inputs": [tensor([1])], "outputs": [{"name": "x", "parameters": [1]}]}).encode(),
        {},
    ),
    ("outputs-a-number", json.dumps({"inputs": [tensor([1])], "outputs": 5}).encode(), {}),
    ("length-superscript", json.dumps({"inputs": [tensor([1])]}).encode(), {"Inference-Header-Content-Length": "²"}),
]


@pytest.mark.parametrize(("body", "headers"), [c[1:] for c in OIP_CASES], ids=[c[0] for c in OIP_CASES])
async def test_oip_tensors_are_checked_before_conversion(daemon: Daemon, body: bytes, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        async with s.post(INFER, data=body, headers={"Content-Type": "application/json", **headers}) as r:
            answer = json.loads(await r.read())
            assert r.status == 400, answer
        assert isinstance(answer["error"], str)  # KServe's shape
        await still_serving(s)


@pytest.mark.parametrize(
    "field", ["temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"]
)
@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_non_finite_sampling_numbers_are_a_400(daemon: Daemon, field: str, value: bytes) -> None:
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "%s": %s}' % (
        SMOLLM2.encode(),
        field.encode(),
        value,
    )
    async with aiohttp.ClientSession(daemon.url) as s:
        status, answer = await post_raw(s, "/v1/chat/completions", body)
        assert status == 400 and "finite" in answer["error"]["message"], answer  # type: ignore[index]
        await still_serving(s)


async def test_other_numbers_that_break_python_are_a_400(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(daemon.url) as s:
        huge = b'{"model": "%s", "input": "x", "keep_alive": %s}' % (DEFAULT.encode(), b"9" * 400)
        status, answer = await post_raw(s, "/v1/embeddings", huge)
        assert status == 400 and "keep_alive" in answer["error"]["message"], answer  # type: ignore[index]
        status, answer = await post_raw(s, "/v1/embeddings", b'{"model": "x", "input": "y", "n": %s}' % (b"1" * 5000))
        assert status == 400, answer
        status, answer = await post_raw(s, "/v1/embeddings", b'{"model": "x", "input": "y", "keep_alive": "nan"}')
        assert status == 400, answer
        await still_serving(s)


# ---- timeouts and connection limits: a daemon of their own, with short limits ----


@pytest.fixture(scope="module")
def strict(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = store_with(store_dir, tmp_path_factory.mktemp("strict-store"), (DEFAULT,))
    env = {
        "LLMOSD_SEED_DEFAULTS": "false",
        "LLMOSD_MDNS": "false",
        "LLMOSD_AUTOTUNE": "false",
        "LLMOSD_HEADER_TIMEOUT_S": "1",
        "LLMOSD_BODY_TIMEOUT_S": "1",
        "LLMOSD_BODY_MIN_RATE_KB_S": "16",
        "LLMOSD_KEEPALIVE_TIMEOUT_S": "2",
        "LLMOSD_WRITE_TIMEOUT_S": "2",
        "LLMOSD_MAX_CONNECTIONS_PER_CLIENT": "8",
    }
    d = start_daemon(store, tmp_path_factory.mktemp("strict-run"), env=env)
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


def connect(d: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Read until the daemon closes the connection; (seconds it took, what it sent)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s (got {got[:200]!r})")
    except ConnectionResetError:
        pass
    return time.monotonic() - started, got


def test_trickled_headers_are_cut_off(strict: Daemon) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        sock.settimeout(0.3)
        got = b""
        while time.monotonic() - started < 6:  # one header byte every 0.3 s: never finishes
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            got += chunk
            if not chunk:
                break
        took = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 408"), got
    assert took < 4, took  # the header timeout is 1 s; the keep-alive one (2 s) would cut it too


def test_a_stalled_or_trickled_body_is_a_408(strict: Daemon) -> None:
    with connect(strict) as sock:  # declares 2 kB, sends 10 bytes, then nothing
        sock.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{"model": ')
        took, got = closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"did not arrive in time" in got and took < 6  # 1 s of grace, 2 s of lingering close
    with connect(strict) as sock:  # chunked, one byte a second
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.settimeout(0.5)
        started, got = time.monotonic(), b""
        while time.monotonic() - started < 8 and not got:
            try:
                sock.sendall(b"1\r\n \r\n")
                got = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert got.startswith(b"HTTP/1.1 408"), got


def test_a_huge_content_length_is_refused_at_once(strict: Daemon) -> None:
    with connect(strict) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n0123456789")
        took, got = closed_within(sock, 5)
    assert got.startswith(b"HTTP/1.1 413"), got
    assert took < 4  # answered at once; then a lingering close of 2 s reads what the client still sends


def test_idle_connections_are_closed(strict: Daemon) -> None:
    socks = [connect(strict) for _ in range(5)]
    try:
        for sock in socks[:3]:  # a request, then idle on keep-alive
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in socks:
            took, _ = closed_within(sock, 6)
            assert took < 4
    finally:
        for sock in socks:
            sock.close()


def test_one_address_cannot_hold_every_descriptor(strict: Daemon) -> None:
    held = [connect(strict) for _ in range(8)]
    try:
        for sock in held:  # each one is really accepted and served
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with connect(strict) as extra:
            _, got = closed_within(extra, 5)
        assert got.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in got, got
        # The Unix socket is the box's own users: not counted, still served.
        with socket.socket(socket.AF_UNIX) as local:
            local.connect(str(strict.socket))
            local.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert local.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with connect(strict) as again:  # closing them gave the room back
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")


async def test_a_client_that_reads_nothing_is_dropped(strict: Daemon) -> None:
    """Pipelined requests for large responses that the client never reads: the write timeout frees them."""
    sentences = ["a fairly long sentence to embed, " * 8] * 64
    body = json.dumps({"model": DEFAULT, "input": sentences}).encode()
    request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    sock = connect(strict)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        for _ in range(40):  # about 40 x 500 kB of answers, far past what the socket buffers hold
            sock.sendall(request % len(body) + body)
        # Never read. The daemon must drop the connection within the write timeout (2 s) of stalling.
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(strict.url) as s:
            while time.monotonic() < deadline:
                async with s.get("/api/status") as r:
                    served = (await r.json())["models"][0]["instances"][0]["batcher"]["completed"]
                if "dropped a connection" in strict.log.read_text():
                    break
                await asyncio.sleep(0.5)
            await still_serving(s)
        assert "it took none of its response for 2 s" in strict.log.read_text()
        assert served < 40  # it stopped answering the connection that read nothing
    finally:
        sock.close()


def test_log_records_are_one_line_in_text_and_in_the_journal() -> None:
    import logging

    from llmosd.logs import EscapeFilter, TextFormatter
    from llmosd.systemd.journal import JournalHandler

    path = "/v1/models/x\n2026-12-01 00:00:00,000 INFO llmosd: forged\x00\x1b[2J\u2028"
    record = logging.LogRecord("llmosd.api", logging.WARNING, __file__, 1, "refused GET %s", (path,), None)
    assert EscapeFilter().filter(record)
    text = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    escaped = "/v1/models/x\\x0a2026-12-01 00:00:00,000 INFO llmosd: forged\\x00\\x1b[2J\\u2028"
    assert text == f"WARNING llmosd.api: refused GET {escaped}"
    journal = JournalHandler(path="/nonexistent")
    message = journal.fields(record)["MESSAGE"]
    journal.sock.close()
    assert "\n" not in message and "\x00" not in message and message.endswith("forged\\x00\\x1b[2J\\u2028")
    # A traceback stays readable but cannot pass for a record of its own: its lines are indented.
    try:
        raise ValueError("bad\nINFO llmosd: forged")
    except ValueError:
        import sys

        failed = logging.LogRecord("llmosd", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = TextFormatter("%(levelname)s %(name)s: %(message)s").format(failed).splitlines()
    assert lines[0] == "ERROR llmosd: failed" and all(line.startswith("    ") for line in lines[1:])
