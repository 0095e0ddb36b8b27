"""Prompt (prefix) caching on the real daemon serving SmolLM2 int4: chats that share a long system prompt
reuse its KV (counted in /metrics), and a cached answer is the cold one, token for token (greedy)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp

from tests.conftest import SMOLLM2, Daemon

SYSTEM = (
    "You are the front-desk assistant of the Harbour View hotel. Check-in is from 3 pm and check-out by "
    "11 am. Breakfast is served from 7 to 10 in the garden room; the pool opens at 8 and closes at 20. "
    "Parking costs 12 euros a night; the airport shuttle leaves every hour from 6 to 22. "
) * 4


async def metric(s: aiohttp.ClientSession, daemon: Daemon, name: str) -> float:
    async with s.get(daemon.url + "/metrics") as r:
        text = await r.text()
    found = re.search(rf'^{name}{{model="{SMOLLM2}"}} (\S+)$', text, re.M)
    assert found, name
    return float(found.group(1))


async def settled(s: aiohttp.ClientSession, daemon: Daemon, name: str, ok: Callable[[float], bool]) -> float:
    """The metric once ``ok`` holds: the worker publishes its counts after a step's chunks are out."""
    for _ in range(100):
        value = await metric(s, daemon, name)
        if ok(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} stayed at {value}")


async def ask(s: aiohttp.ClientSession, daemon: Daemon, question: str) -> str:
    body = {
        "model": SMOLLM2,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 24,
    }
    async with s.post(daemon.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        content: str = (await r.json())["choices"][0]["message"]["content"]
        return content


async def test_a_shared_system_prompt_is_prefilled_once_and_answers_do_not_change(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        hits = await metric(s, daemon, "llmosd_prefix_cache_hits_total")
        tokens = await metric(s, daemon, "llmosd_prefix_cache_hit_tokens_total")
        queries = await metric(s, daemon, "llmosd_prefix_cache_queries_total")
        cold = await ask(s, daemon, "When is breakfast?")  # the first with this system prompt: nothing cached
        await ask(s, daemon, "How much is parking?")  # hits the system prompt's blocks
        warm = await ask(s, daemon, "When is breakfast?")  # hits, the question's own blocks too
        assert warm == cold
        await settled(s, daemon, "llmosd_prefix_cache_queries_total", lambda v: v - queries == 3)
        assert await metric(s, daemon, "llmosd_prefix_cache_hits_total") - hits == 2
        # The system prompt is ~300 tokens: both later prompts copied at least its whole blocks.
        assert await metric(s, daemon, "llmosd_prefix_cache_hit_tokens_total") - tokens >= 2 * 256
        assert await metric(s, daemon, "llmosd_prefix_cache_bytes") > 0
