"""The Python SDK against a real daemon (socket and TCP), and its retries against a real aiohttp server
that answers 503 / 429 with Retry-After."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from llmosd import AsyncClient, Client
from llmosd.client import ApiError, ConnectionFailed
from tests.conftest import DEFAULT, SMOLLM2, Daemon
from tests.registry import serve_on_loopback

QUESTION = "What is the capital of France? Answer in one word."


async def test_the_async_client_matches_the_sync_one(daemon: Daemon) -> None:
    want = Client(socket=daemon.socket).load_model(SMOLLM2).generate_text(QUESTION, max_tokens=16, temperature=0)
    for client in (AsyncClient(socket=daemon.socket), AsyncClient(daemon.url, token=daemon.token)):
        async with client:
            model = await client.load_model(SMOLLM2)
            text = await model.generate_text(QUESTION, max_tokens=16, temperature=0)
            assert text == want and "Paris" in text
            pieces = [p async for p in model.stream_text(QUESTION, max_tokens=16, temperature=0)]
            assert "".join(pieces) == text and len(pieces) > 2
            messages = [{"role": "user", "content": QUESTION}]
            assert await model.chat(messages, max_tokens=16, temperature=0) == text
            assert "".join([p async for p in model.stream_chat(messages, max_tokens=16, temperature=0)]) == text
            raw = await model.generate_text("The capital of France is", raw=True, max_tokens=4, temperature=0)
            assert isinstance(raw, str) and raw
            vectors = await (await client.load_model(DEFAULT)).embed(["a", "b"])
            assert len(vectors) == 2 and len(vectors[0]) == 384
            labels = await (await client.load_model("tiny-clf")).classify("some text")
            assert labels and "label" in labels[0]
            assert (await client.status())["ready"] is True
            assert (await client.hardware())["cpu"]["physical_cores"] >= 1
            assert {m["id"] for m in await client.models()} >= {DEFAULT, SMOLLM2}
            with pytest.raises(ApiError) as err:
                await client.load_model("nope")
            assert err.value.status == 404 and "store has no such model" in err.value.message


class Flaky:
    """A loopback server that answers ``status`` with Retry-After for the first ``failures`` requests."""

    def __init__(self, status: int, failures: int, retry_after: str = "0.3") -> None:
        self.status, self.failures, self.retry_after = status, failures, retry_after
        self.seen: list[float] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(time.monotonic())
        if len(self.seen) <= self.failures:
            body = {"error": {"message": "busy", "type": "rate_limit_error"}}
            return web.json_response(body, status=self.status, headers={"Retry-After": self.retry_after})
        return web.json_response({"object": "list", "data": [{"id": "m"}]})


@pytest.fixture
def flaky_server(request: pytest.FixtureRequest) -> Iterator[Flaky]:
    flaky = Flaky(*request.param)
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/v1/models", flaky.handle)
        runner, flaky.port = await serve_on_loopback(app)
        return runner

    runner = loop.run_until_complete(start())
    thread = threading.Thread(target=lambda: (ready.set(), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait()
    try:
        yield flaky
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("flaky_server", [(503, 2), (429, 2)], indirect=True)
async def test_both_clients_retry_busy_answers_after_retry_after(flaky_server: Flaky) -> None:
    url = f"http://127.0.0.1:{flaky_server.port}"
    assert await asyncio.to_thread(lambda: Client(url).models()) == [{"id": "m"}]
    gaps = [b - a for a, b in zip(flaky_server.seen, flaky_server.seen[1:], strict=False)]
    assert len(flaky_server.seen) == 3 and min(gaps) >= 0.29  # waited what Retry-After said, twice
    flaky_server.seen.clear()
    async with AsyncClient(url) as client:
        assert await client.models() == [{"id": "m"}]
    assert len(flaky_server.seen) == 3
    flaky_server.seen.clear()
    with pytest.raises(ApiError) as err:  # out of retries: the server's own error
        await asyncio.to_thread(lambda: Client(url, retries=1).models())
    assert err.value.status == flaky_server.status and err.value.message == "busy"


async def test_a_client_with_nowhere_to_go_says_where_it_looked() -> None:
    with pytest.raises(ConnectionFailed, match=r"cannot reach llmosd at http://127\.0\.0\.1:9"):
        await asyncio.to_thread(lambda: Client("http://127.0.0.1:9").models())
    with pytest.raises(ConnectionFailed, match=r"cannot reach llmosd at http://127\.0\.0\.1:9"):
        async with AsyncClient("127.0.0.1:9") as client:
            await client.models()
