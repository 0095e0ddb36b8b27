"""Loading on first request and unloading after keep_alive, on a real daemon (Ollama's model lifecycle)."""

from __future__ import annotations

import asyncio
import json
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
    shutil.rmtree(state / "models" / "smollm2-135m-instruct")
    parked = tmp_path / "parked"
    shutil.move(state / "models" / "minilm-fp32", parked)  # not in the store when the daemon starts
    broken = tmp_path / "broken"
    shutil.move(state / "models" / "tiny-clf", broken)  # nor this one, whose model file gets corrupted
    manifest = json.loads((broken / "1" / "manifest.json").read_text())
    blob = state / "blobs" / "sha256" / next(f["digest"] for f in manifest["files"] if f["role"] == "model")[7:]
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
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
            shutil.move(broken, state / "models" / "tiny-clf")
            async with s.post(d.url + "/v1/classify", json={"model": "tiny-clf", "input": "x"}) as r:
                error = (await r.json())["error"]
            assert r.status == 503 and "cannot be loaded" in error["message"] and "corrupt" in error["message"]
            async with s.post(d.url + "/v1/embeddings", json=body) as r:
                assert r.status == 200  # and everything else serves on
    finally:
        assert d.stop() == 0
    assert "unloading minilm-fp32: idle" in d.log.read_text()
