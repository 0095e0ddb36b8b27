"""The second hostile-client round (issue 33), each repro sent to a real daemon: what a client can send
neither holds the model nor the event loop, nor leaks a secret, nor gives garbage with a 200."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.conftest import SMOLLM2, Daemon


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
