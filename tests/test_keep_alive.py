"""Loading on first request and unloading after keep_alive, on a real daemon (Ollama's model lifecycle)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import DEFAULT, start_daemon


async def loaded(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/v1/models") as r:
        return {m["id"]: m["loaded"] for m in (await r.json())["data"]}


async def test_a_model_added_to_the_store_loads_on_first_use_and_unloads_when_idle(
    store_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    for name in ("tiny-clf", "smollm2-135m-instruct"):
        shutil.rmtree(state / "models" / name)
    parked = tmp_path / "parked"
    shutil.move(state / "models" / "minilm-fp32", parked)  # not in the store when the daemon starts
    env = {"LLMOSD_KEEP_ALIVE_S": "2", "LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false"}
    d = start_daemon(state, tmp_path, env=env)
    try:
        async with aiohttp.ClientSession() as s:
            assert await loaded(s, d.url) == {DEFAULT: True}
            shutil.move(parked, state / "models" / "minilm-fp32")  # e.g. pulled while running
            assert await loaded(s, d.url) == {DEFAULT: True, "minilm-fp32": False}
            body = {"model": "minilm-fp32", "input": "hello"}
            async with s.post(d.url + "/v1/embeddings", json=body) as r:
                assert r.status == 200  # loaded on first use
            assert await loaded(s, d.url) == {DEFAULT: True, "minilm-fp32": True}
            for _ in range(60):  # idle past keep_alive (2 s): unloaded; the daemon's own model stays
                if not (await loaded(s, d.url))["minilm-fp32"]:
                    break
                await asyncio.sleep(0.2)
            assert await loaded(s, d.url) == {DEFAULT: True, "minilm-fp32": False}
            async with s.post(d.url + "/v1/embeddings", json=body | {"keep_alive": -1}) as r:
                assert r.status == 200  # back on demand, now kept for good
            await asyncio.sleep(4)
            assert (await loaded(s, d.url))["minilm-fp32"] is True
            async with s.post(d.url + "/v1/embeddings", json=body | {"keep_alive": "soon"}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "keep_alive"
            async with s.post(d.url + "/v1/embeddings", json={"model": "absent", "input": "x"}) as r:
                assert r.status == 404 and "store has no such model" in (await r.json())["error"]["message"]
    finally:
        assert d.stop() == 0
    assert "unloading minilm-fp32: idle" in d.log.read_text()
