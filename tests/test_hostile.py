"""The second hostile-client round (issue 33), each repro sent to a real daemon: what a client can send
neither holds the model nor the event loop, nor leaks a secret, nor gives garbage with a 200."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import BLOCKED, DEFAULT, SMOLLM2, Daemon, exported, start_daemon, store_with, unix_json
from tests.netns import HOST_ADDR, NS_ADDR

LOOP_BLOCK_MS = 50  # the issue's bound on the event loop's largest block beside any hostile request
# A stream's largest gap beside a long prompt: a decode step and one chunk (a prefill chunk of 128 positions
# or a scored one of 64: 0.15-0.35 s on an idle AVX-512 box, twice that on AVX2, plus two processes
# sharing two cores), where the whole prompt in one run took 3-7 s.
CHUNK_GAP_S = 1.5
DECODE_BLOCK_MS = 150  # a legitimate multi-megabyte body's parse (the GIL held by json.loads), at most
WRITE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def hostile(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon of its own whose loop watch logs any wake-up later than 50 ms (the suite's conftest fails
    a test during which one is logged, and the tests below read the log themselves too)."""
    store = store_with(store_dir, tmp_path_factory.mktemp("hostile-store"), (DEFAULT, SMOLLM2))
    env = {
        "LLMOSD_SEED_DEFAULTS": "false",
        "LLMOSD_MDNS": "false",
        "LLMOSD_AUTOTUNE": "false",
        "LLMOSD_LOOP_BLOCK_MS": str(LOOP_BLOCK_MS),
        "LLMOSD_WRITE_TIMEOUT_S": str(WRITE_TIMEOUT_S),
    }
    d = start_daemon(store, tmp_path_factory.mktemp("hostile-run"), env=env)
    # Both models answer once and the start-up's last work (a load's warm-up) is over before any test
    # reads the log: only what the tests send is measured.
    unix_json(d, "/v1/embeddings", {"model": DEFAULT, "input": "warm"})
    unix_json(d, "/v1/completions", {"model": SMOLLM2, "prompt": "warm", "max_tokens": 2})
    time.sleep(1)
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


class Watch:
    """What the daemon logged from now on, and the largest gap between answers to /healthz polled meanwhile
    (from another process: an upper bound on the loop's block that includes both processes' scheduling)."""

    def __init__(self, d: Daemon) -> None:
        self.d, self.offset, self.gap = d, d.log.stat().st_size, 0.0

    def logged(self) -> str:
        with self.d.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def blocks(self) -> list[str]:
        return [line for line in self.logged().splitlines() if BLOCKED in line]

    async def poll(self, s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            async with s.get("/healthz") as r:
                assert r.status == 200
            now = time.perf_counter()
            self.gap, last = max(self.gap, now - last), now
            await asyncio.sleep(0.005)


async def beside(d: Daemon, send: object) -> tuple[object, Watch]:
    """Run the coroutine ``send`` while /healthz is polled; its result and the watch."""
    watch, stop = Watch(d), asyncio.Event()
    async with aiohttp.ClientSession(d.url) as s:
        poller = asyncio.create_task(watch.poll(s, stop))
        await asyncio.sleep(0.1)
        try:
            result = await send  # type: ignore[misc]
        finally:
            stop.set()
            await poller
    return result, watch


async def complete(s: aiohttp.ClientSession, **fields: object) -> tuple[int, dict[str, object]]:
    body = {"model": SMOLLM2, "prompt": "The capital of France is", "max_tokens": 6, **fields}
    async with s.post("/v1/completions", data=json.dumps(body)) as r:
        return r.status, await r.json()


async def test_a_tiny_temperature_is_greedy_and_a_tiny_penalty_a_400(daemon: Daemon) -> None:
    """1e-38 is under float32's smallest normal: dividing by it sampled from NaN logits ("hobby hobby …")."""
    async with aiohttp.ClientSession(daemon.url) as s:
        status, greedy = await complete(s, temperature=0)
        assert status == 200, greedy
        for t in (1e-38, 1e-300, 5e-6):
            status, tiny = await complete(s, temperature=t, seed=3)
            assert status == 200 and tiny["choices"] == greedy["choices"], (t, tiny)  # type: ignore[index]
        for p in (1e-300, 1e-3, 0):
            status, answer = await complete(s, repetition_penalty=p)
            assert status == 400 and "[0.01, 10" in answer["error"]["message"], answer  # type: ignore[index]
        status, answer = await complete(s, repetition_penalty=0.01, temperature=0)
        assert status == 200 and answer["choices"][0]["text"], answer  # type: ignore[index]


def nested_body(size: int) -> bytes:
    """The repro: under the 8 MiB limit and the 64-level depth limit, millions of nested lists."""
    inner = b"[" * 58 + b"0" + b"]" * 58
    count = (size - 60) // (len(inner) + 1)
    return b'{"model": "%s", "input": "x", "z": [' % DEFAULT.encode() + b",".join([inner] * count) + b"]}"


async def post(d: Daemon, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(d.url) as s,
        s.post(path, data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize("size", [1 << 20, 7_850_000])
async def test_a_body_of_millions_of_values_is_a_413_without_blocking_the_loop(hostile: Daemon, size: int) -> None:
    """7.85 MB of nested lists blocked every connection for 7.4 s: now a count over the bytes refuses it."""
    (status, answer), watch = await beside(hostile, post(hostile, "/v1/embeddings", nested_body(size)))
    assert status == 413 and "JSON values" in answer["error"]["message"], answer  # type: ignore[index]
    assert not watch.blocks(), watch.blocks()
    assert watch.gap < 1.0, watch.gap  # scheduling of two processes on a loaded box included; the log holds 50 ms


@pytest.mark.blocks_loop  # by the parse's GIL, within DECODE_BLOCK_MS: checked here, not by conftest's 50 ms
async def test_a_large_legitimate_body_is_decoded_off_the_loop(hostile: Daemon) -> None:
    """Megabytes of text and a long token-id list: decoded (on the decoder's thread) and answered."""
    sentence = 'a sentence, [with] {brackets}, and \\"quotes\\".'
    # Few inputs: the model's own threads, computing thousands, compete with the loop for the two cores
    text = json.dumps({"model": DEFAULT, "input": [sentence] * 20, "user": "x" * 3_000_000})
    ids = json.dumps({"model": DEFAULT, "input": [list(range(1000, 1100))] * 20, "z": list(range(200_000))})
    for body in (text, ids):
        (status, answer), watch = await beside(hostile, post(hostile, "/v1/embeddings", body.encode()))
        assert status == 200 and len(answer["data"]) == 20, answer.get("error")  # type: ignore[arg-type]
        # The decoder thread's json.loads holds the GIL for the whole parse (200,000 integers: tens of ms),
        # so the loop waits that long: bounded by DECODE_BLOCK_MS, not this module's 50 ms (meant for the
        # hostile bodies, refused by a count before any decoding). Measured here: up to 103 ms.
        worst = max((float(line.split("blocked for ")[1].split(" ms")[0]) for line in watch.blocks()), default=0.0)
        assert worst < DECODE_BLOCK_MS, watch.blocks()


RAW_CLIENT = textwrap.dedent(
    """
    import json, socket, ssl, sys
    host, port, cafile, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tls = ssl.create_default_context(cafile=cafile)
    def send(head):
        with socket.create_connection((host, port), timeout=10) as raw:
            with tls.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(head)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
        return got.decode("latin-1")
    t = token.encode()
    heads = [
        b"Authorization: Bearer " + t + b"\\x0b",
        b"Authorization: Bearer " + t[:8] + b"\\x00" + t[8:],
        b"Authori zation: Bearer " + t,
        b" Authorization: Bearer " + t,
        b"X-Api-Key: " + t + b"\\x7f",
        b"Cookie: session=" + t + b"\\x01",
        b"Authorization: Bearer " + t + b"A" * 9000,
        b"Authorization: Bearer " + t + b"\\r\\n\\x01bad: x",
    ]
    out = [send(b"GET /v1/models HTTP/1.1\\r\\nHost: box\\r\\n" + h + b"\\r\\n\\r\\n") for h in heads]
    out.append(send(b"GET /v1/models?token=" + t + b"\\x01 HTTP/1.1\\r\\nHost: box\\r\\n\\r\\n"))
    print(json.dumps(out))
"""
)


def test_a_malformed_header_never_writes_the_token_anywhere(netns: str, store_dir: Path, tmp_path: Path) -> None:
    """``Authorization: Bearer <token>\\x0b`` from the LAN: aiohttp's parser answered a text 400 echoing the
    line and logged an ERROR whose traceback held the token, for every request. Each variant from another
    namespace, with the daemon's real token: a JSON 400 naming the parser's reason, one log line for the
    client however many it sends, no traceback, and the token nowhere."""
    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    env = {"LLMOSD_MDNS": "false", "LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"}
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, env=env)
    try:
        client = [sys.executable, "-c", RAW_CLIENT, HOST_ADDR, str(d.port), str(exported(d, tmp_path)), d.token]
        r = subprocess.run(["ip", "netns", "exec", netns, *client], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        answers = json.loads(r.stdout)
    finally:
        assert d.stop() == 0
    assert len(answers) == 9
    for answer in answers:
        head, _, body = answer.partition("\r\n\r\n")
        assert head.split(" ")[1] == "400" and "application/json" in head, answer[:300]
        assert json.loads(body)["error"]["message"].startswith("malformed HTTP request: "), body
        assert d.token not in answer
    log = d.log.read_text()
    assert d.token not in log and d.token[:8] not in log
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "malformed HTTP request from" in line]
    assert len(lines) == 1 and NS_ADDR in lines[0], lines  # the other eight are counted into its next line


# ---- grammars: compiled off the loop and off the engine, within a budget, before the request is queued ----


async def stream_gaps(d: Daemon, started: asyncio.Event, tokens: int = 200) -> list[float]:
    """A greedy stream of ``tokens`` tokens; the gaps between its chunks (``started`` set at the first)."""
    body = {"model": SMOLLM2, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    gaps: list[float] = []
    async with aiohttp.ClientSession(d.url) as s, s.post("/v1/completions", json=body) as r:
        assert r.status == 200
        last = None
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            if last is None:
                started.set()
            else:
                gaps.append(now - last)
            last = now
    return gaps


async def with_a_stream(d: Daemon, hostile: object) -> tuple[object, float, Watch]:
    """Run ``hostile`` (a coroutine) once a stream beside it has started; its result, the stream's largest
    gap while both ran, and what the daemon logged."""
    watch, started = Watch(d), asyncio.Event()
    stream = asyncio.create_task(stream_gaps(d, started))
    await started.wait()
    result = await hostile  # type: ignore[misc]
    gaps = await stream
    return result, max(gaps), watch


def chat(**fields: object) -> bytes:
    body = {"model": SMOLLM2, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 40}
    return json.dumps(body | fields).encode()


def schema_format(schema: object) -> dict[str, object]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


HOSTILE_PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a{1000}){1000}$"}}}


def tool(parameters: object) -> dict[str, object]:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}


@pytest.mark.parametrize(
    "fields",
    [
        schema_format(HOSTILE_PATTERN | {"required": ["a"]}),
        tool(HOSTILE_PATTERN | {"required": ["a"]}) | {"tool_choice": "required"},
    ],
    ids=["response_format", "tool"],
)
async def test_a_hostile_pattern_is_a_400_naming_the_budget_every_time(hostile: Daemon, fields: object) -> None:
    """`^(a{1000}){1000}$` stalled every stream ~4 s and the loop 0.5-0.8 s, and sent again answered 200 with
    empty content from the cached grammar. Now: a 400 that names the engine's budget, each time."""
    for _ in range(2):
        started = time.perf_counter()
        (status, answer), gap, watch = await with_a_stream(
            hostile, post(hostile, "/v1/chat/completions", chat(**fields))
        )  # type: ignore[arg-type,misc]
        assert status == 400 and "budget" in answer["error"]["message"], answer
        assert time.perf_counter() - started < 30
        assert gap < 1.0, gap
        assert not watch.blocks(), watch.blocks()


UNSATISFIABLE = [
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
]


@pytest.mark.parametrize("schema", UNSATISFIABLE, ids=["self", "mutual", "allOf-self"])
async def test_a_schema_that_admits_nothing_is_a_400_before_generation(hostile: Daemon, schema: object) -> None:
    status, answer = await post(hostile, "/v1/chat/completions", chat(**schema_format(schema)))
    assert status == 400 and "admits no output" in answer["error"]["message"], answer  # type: ignore[index]


async def test_tool_parameters_with_defs_and_refs_work_as_pydantic_writes_them(hostile: Daemon) -> None:
    """What pydantic's model_json_schema() gives for a model with a nested model: the definitions under $defs,
    referred to from the root. Embedded in the tool-call grammar they were lost ("Pointer '/$defs/A' does
    not exist"); now the call's arguments follow them."""
    import jsonschema

    params = {
        "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/City"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    }
    body = chat(**tool(params), tool_choice="required", temperature=0, max_tokens=80)
    status, answer = await post(hostile, "/v1/chat/completions", body)
    assert status == 200, answer
    calls = answer["choices"][0]["message"]["tool_calls"]  # type: ignore[index]
    assert calls and calls[0]["function"]["name"] == "f"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), params)


# ---- prompt scoring (echo + logprobs) beside running streams ----


def scoring(tokens: int) -> bytes:
    body = {"model": SMOLLM2, "prompt": " the" * tokens, "max_tokens": 0, "echo": True, "logprobs": 1}
    return json.dumps(body).encode()


async def running_sequences(d: Daemon) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(d.url) as s, s.get("/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        if family.name == "llmosd_running_sequences":
            return sum(x.value for x in family.samples if x.labels.get("model", "").startswith(SMOLLM2))
    raise AssertionError("no llmosd_running_sequences in /metrics")


async def test_prompt_scoring_runs_in_chunks_beside_streams_and_stops_when_its_client_leaves(hostile: Daemon) -> None:
    """A 2,000-token `echo` + `logprobs` request scored its prompt one position a run while every other
    sequence waited (a stream's largest gap: 118.7 s), and ran on after its client closed (the next
    2-token completion: 115.8 s). Now the prompt runs in chunks between the others' decode steps, each
    chunk's run returning every position's logits: it completes beside a stream that never waits more
    than a chunk, and an abandoned one leaves at its next chunk."""
    (status, answer), gap, watch = await with_a_stream(hostile, post(hostile, "/v1/completions", scoring(2000)))
    assert status == 200, answer
    assert gap < CHUNK_GAP_S, gap
    assert not watch.blocks(), watch.blocks()
    lp = answer["choices"][0]["logprobs"]  # type: ignore[index]
    assert "".join(lp["tokens"]).endswith(" the" * 2000) and len(lp["token_logprobs"]) == len(lp["tokens"])
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])

    async def leave_early() -> float:
        """The 2,000-token request, abandoned after 1 s; then how long a 2-token completion takes."""
        async with aiohttp.ClientSession(hostile.url, timeout=aiohttp.ClientTimeout(total=1)) as s:
            with pytest.raises(TimeoutError):
                async with s.post("/v1/completions", data=scoring(2000)) as r:
                    await r.read()
        started = time.perf_counter()
        status, answer = await complete_in(hostile, max_tokens=2)
        assert status == 200, answer
        return time.perf_counter() - started

    next_one, gap, watch = await with_a_stream(hostile, leave_early())
    assert gap < CHUNK_GAP_S, gap
    assert next_one < 5.0, next_one  # the abandoned scoring no longer holds the model
    assert not watch.blocks(), watch.blocks()
    for _ in range(50):  # the abandoned row left the batch (the stream has ended by now)
        if await running_sequences(hostile) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the abandoned scoring request still holds a row")


async def test_a_long_prompt_is_prefilled_in_chunks_beside_a_stream(hostile: Daemon) -> None:
    """A prompt of thousands of tokens was one run that every running stream waited for (7,000 tokens:
    85 s). Now it runs in chunks of ``prefill_chunk_tokens`` between the stream's decode steps."""
    # Not " the" again: the scoring test's prompt is in the prompt cache, and this one must be prefilled
    body = {"model": SMOLLM2, "prompt": " and" * 1500, "max_tokens": 2, "temperature": 0}
    (status, answer), gap, watch = await with_a_stream(
        hostile, post(hostile, "/v1/completions", json.dumps(body).encode())
    )
    assert status == 200 and answer["usage"]["prompt_tokens"] >= 1500, answer  # type: ignore[index]
    assert answer["choices"][0]["text"], answer  # type: ignore[index]
    assert gap < CHUNK_GAP_S, gap
    assert not watch.blocks(), watch.blocks()


async def complete_in(d: Daemon, **fields: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession(d.url) as s:
        return await complete(s, **fields)


async def test_a_stream_nobody_reads_is_dropped_a_write_timeout_after_its_last_acknowledged_byte(
    hostile: Daemon,
) -> None:
    """A client that reads nothing of a stream kept its generation row 20 s past write_timeout_s: the timer
    started only once the kernel's buffers (800 KB) and the transport's were full, which a stream of tokens
    takes long to fill. Now it runs from the last byte the client's side acknowledged."""
    import socket

    body = json.dumps(
        {"model": SMOLLM2, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    ).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    watch = Watch(hostile)
    sock = socket.create_connection(("127.0.0.1", hostile.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its window closes after a few kB
    try:
        sock.sendall(head % len(body) + body)
        started = time.monotonic()
        while "dropped a connection" not in watch.logged():
            assert time.monotonic() - started < 30, "the stream nobody reads is still running"
            await asyncio.sleep(0.1)
        took = time.monotonic() - started
    finally:
        sock.close()
    # The window closes within a second or so of the first tokens; then the write timeout runs.
    assert took < WRITE_TIMEOUT_S + 4, took
    for _ in range(20):
        if await running_sequences(hostile) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the dropped stream's row is still running")


# ---- the smaller items ----


async def test_every_405_names_the_allowed_methods(hostile: Daemon) -> None:
    async with aiohttp.ClientSession(hostile.url) as s:
        for method, path, allowed in [
            ("GET", "/v1/completions", "POST"),
            ("DELETE", "/v1/embeddings", "POST"),
            ("POST", "/metrics", "GET"),
            ("PUT", f"/v2/models/{DEFAULT}/infer", "POST"),
        ]:
            async with s.request(method, path) as r:
                assert r.status == 405, (method, path)
                assert allowed in r.headers.get("Allow", ""), (method, path, dict(r.headers))
                assert (await r.json())["error"]


@pytest.mark.parametrize(
    ("ids", "needle"),
    [([2**70], "at most 1024 token ids"), (list(range(100_000)), "at most 1024"), ([49_152], "outside the vocabulary")],
    ids=["2^70", "100000 ids", "past the vocabulary"],
)
async def test_stop_token_ids_are_bounded(hostile: Daemon, ids: list[int], needle: str) -> None:
    async with aiohttp.ClientSession(hostile.url) as s:
        status, answer = await complete(s, stop_token_ids=ids)
    assert status == 400 and needle in answer["error"]["message"], answer  # type: ignore[index]
