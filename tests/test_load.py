"""A bounded load test on loopback (it ends by itself): 5,000 embedding requests at concurrency 64 beside
100 chat requests at concurrency 16, twice. Every answer is a 2xx, or a 429 that says when to retry; and
the daemon's memory does not grow from the end of the first round to the end of the second."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.conftest import DEFAULT, SENTENCES, SMOLLM2, Daemon, start_daemon, store_with

EMBEDDINGS, EMBED_CONCURRENCY = 5000, 64
CHATS, CHAT_CONCURRENCY = 100, 16
ROUND_TIMEOUT_S = 300  # far past a round here (about 20 s): reaching it fails the test, never hangs it


async def _burst(session: aiohttp.ClientSession, count: int, concurrency: int, make: object) -> Counter[str]:
    statuses: Counter[str] = Counter()
    work = iter(range(count))

    async def client() -> None:
        for i in work:
            path, body = make(i)  # type: ignore[operator]
            async with session.post(path, json=body) as r:
                await r.read()
                if r.status == 429 and not r.headers.get("Retry-After", "").isdigit():
                    statuses["429 without Retry-After"] += 1
                else:
                    statuses[str(r.status)] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


def _embedding(i: int) -> tuple[str, dict[str, object]]:
    return "/v1/embeddings", {"model": DEFAULT, "input": SENTENCES[i % len(SENTENCES)]}


def _chat(i: int) -> tuple[str, dict[str, object]]:
    question = SENTENCES[i % len(SENTENCES)]
    body = {"model": SMOLLM2, "messages": [{"role": "user", "content": question}], "max_tokens": 16}
    return "/v1/chat/completions", body


async def _round(d: Daemon) -> Counter[str]:
    connector = aiohttp.TCPConnector(limit=EMBED_CONCURRENCY + CHAT_CONCURRENCY)
    async with aiohttp.ClientSession(d.url, connector=connector) as s:
        embeds, chats = await asyncio.wait_for(
            asyncio.gather(
                _burst(s, EMBEDDINGS, EMBED_CONCURRENCY, _embedding), _burst(s, CHATS, CHAT_CONCURRENCY, _chat)
            ),
            ROUND_TIMEOUT_S,
        )
    return embeds + chats


def _rss(d: Daemon) -> int:
    time.sleep(3)  # past the workers' idle release (2 s), the same for both rounds
    rss: int = psutil.Process(d.proc.pid).memory_info().rss
    return rss


@pytest.fixture
def loaded_daemon(store_dir: Path, tmp_path: Path) -> Daemon:
    store = store_with(store_dir, tmp_path / "store", (DEFAULT, SMOLLM2))
    env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false"}
    return start_daemon(store, tmp_path, env=env)


async def test_two_rounds_of_load_answer_everything_and_hold_memory_flat(loaded_daemon: Daemon) -> None:
    d = loaded_daemon
    try:
        first = await _round(d)
        after_first = await asyncio.to_thread(_rss, d)
        second = await _round(d)
        after_second = await asyncio.to_thread(_rss, d)
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    for statuses in (first, second):
        assert sum(statuses.values()) == EMBEDDINGS + CHATS
        assert set(statuses) <= {"200", "429"}, statuses
        assert statuses["200"] >= EMBEDDINGS // 2, statuses  # refusals are the exception, not the answer
    growth = after_second / after_first - 1
    assert growth < 0.05, f"RSS {after_first >> 20} MB after round one, {after_second >> 20} MB after round two"
