"""Pulling a new version into a running daemon and activating it while requests keep coming: none fails;
the old version drains and unloads; rollback does the same backwards; a refused pull changes nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from llmosd.registry import Registry, parse_reference, push
from llmosd.registry.signing import generate_key, load_private, sign
from llmosd.store import ModelStore
from tests.conftest import DEFAULT, start_daemon
from tests.registry import docker_registry


async def status_of(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/api/status") as r:
        return {m["name"]: m for m in (await r.json())["models"]}


class Load:
    """Embedding requests in a loop from several tasks; counts answers by status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.codes: dict[int, int] = {}
        self.precisions: set[str] = set()
        self._stop = asyncio.Event()

    async def _loop(self, s: aiohttp.ClientSession, i: int) -> None:
        while not self._stop.is_set():
            body = {"model": DEFAULT, "input": [f"request {i} about the weather"]}
            async with s.post(self.url + "/v1/embeddings", json=body) as r:
                self.codes[r.status] = self.codes.get(r.status, 0) + 1
                await r.read()

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._loop(self._session, i)) for i in range(6)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()


async def test_a_pulled_version_activates_under_load_and_rolls_back(store_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "edge.key"
    generate_key(key)
    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    for name in ("minilm-fp32", "tiny-clf", "smollm2-135m-instruct"):
        shutil.rmtree(state / "models" / name)
    ModelStore(state).collect_garbage()  # their files go too: the pull must fetch them
    (state / "trust").mkdir()
    shutil.copy(tmp_path / "edge.key.pub", state / "trust")
    with docker_registry(tmp_path / "registry") as reg:
        v2 = f"{reg.host}/models/minilm:v2"
        unsigned = f"{reg.host}/models/minilm:unsigned"
        async with aiohttp.ClientSession() as s:
            registry = Registry(reg.host, s)
            digest = (await push(ModelStore(store_dir), "minilm-fp32", None, parse_reference(v2), registry)).digest
            await sign(registry, "models/minilm", digest, load_private(key), tmp_path)
            await push(ModelStore(store_dir), "tiny-clf", None, parse_reference(unsigned), registry)  # another digest
        env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"}
        d = start_daemon(state, tmp_path, env=env)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(d.url + "/api/models/pull", json={"ref": unsigned, "name": DEFAULT}) as r:
                    refused = await r.json()
                assert r.status == 403 and "is not signed" in refused["error"]["message"]
                assert (await status_of(s, d.url))[DEFAULT]["version"] == "1"

                async with Load(d.url) as load:
                    await asyncio.sleep(1)
                    async with s.post(d.url + "/api/models/pull", json={"ref": v2, "name": DEFAULT}) as r:
                        pulled = await r.json()
                    assert r.status == 200, pulled
                    await asyncio.sleep(1)  # requests now on the new version
                assert pulled["version"] == "2" and pulled["precision"] == "fp32" and pulled["serving"] is True
                assert load.codes.get(200, 0) > 20 and set(load.codes) == {200}  # nothing failed meanwhile
                model = (await status_of(s, d.url))[DEFAULT]
                assert (model["version"], model["precision"]) == ("2", "fp32")
                async with s.get(d.url + "/api/models/pulls") as r:
                    pulls = await r.json()
                done = [p for p in pulls["finished"] if p["status"] == "done"]
                assert done[-1]["bytes_done"] == done[-1]["bytes_total"] > 0
                assert [p["status"] for p in pulls["finished"]] == ["failed", "done"]

                async with Load(d.url) as load:
                    await asyncio.sleep(0.5)
                    r2 = await asyncio.to_thread(
                        subprocess.run,
                        [sys.executable, "-m", "llmosd", "models", "rollback", DEFAULT, "--socket", str(d.socket)],
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    await asyncio.sleep(1)
                assert r2.returncode == 0 and f"rolled back {DEFAULT} to version 1" in r2.stdout, r2.stderr
                assert load.codes.get(200, 0) > 20 and set(load.codes) == {200}
                assert (await status_of(s, d.url))[DEFAULT]["version"] == "1"
                async with s.post(d.url + f"/api/models/{DEFAULT}/rollback") as r:
                    assert r.status == 409  # nothing older than version 1
                async with s.post(d.url + f"/api/models/{DEFAULT}/activate", json={"version": "7"}) as r:
                    assert r.status == 404
        finally:
            assert d.stop() == 0
    log = d.log.read_text()
    assert f"unloaded {DEFAULT}:1 (replaced)" in log and f"unloaded {DEFAULT}:2 (replaced)" in log
