"""The registry sync in a running daemon: a subscribed tag is pulled and served; a new digest pushed to it
is smoke-tested and activated while requests keep coming (none fails); a version that fails its smoke
test is refused and the old one keeps serving; with the registry gone, it serves on and says so."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from llmosd.registry import Registry, parse_reference, push
from llmosd.registry.signing import generate_key, load_private, sign
from llmosd.store import ModelStore
from tests.conftest import DEFAULT, start_daemon
from tests.registry import docker_registry

NAME = "edge-minilm"


def broken_store(store_dir: Path, dst: Path) -> ModelStore:
    """DEFAULT's manifest and files, but a model file of random bytes: digests fine, not loadable."""
    src = ModelStore(store_dir)
    m = src.manifest(DEFAULT)
    store = ModelStore(dst)
    with store.tmpdir() as tmp:
        files = {}
        for f in m.files:
            path = tmp / f.path.replace("/", "_")
            if f.role == "model":
                path.write_bytes(os.urandom(4096))
            else:
                shutil.copy(src.blob_path(f.digest), path)
            files[f.path] = (path, f.role)
        store.publish(replace(m, version="1"), files)
    return store


def picky_store(store_dir: Path, dst: Path, texts: list[str]) -> tuple[ModelStore, str]:
    """minilm-fp32 with its word-embedding table cut after the highest token id of ``texts`` (the smoke
    test's and the health probe's): it passes both and fails any text with a later token — real traffic.
    Also a text that such a version fails on."""
    import onnx
    from onnx import numpy_helper
    from tokenizers import Tokenizer

    src = ModelStore(store_dir)
    m = src.manifest("minilm-fp32")
    tokenizer = Tokenizer.from_file(str(src.blob_path(m.file("tokenizer").digest)))
    highest = max(i for t in texts for i in tokenizer.encode(t).ids)
    vocab = tokenizer.get_vocab()
    word = next(w for w, i in sorted(vocab.items(), key=lambda kv: -kv[1]) if w.isalpha() and i > highest + 100)
    store = ModelStore(dst)
    with store.tmpdir() as tmp:
        model = onnx.load(str(src.blob_path(m.file("model").digest)))
        table = next(x for x in model.graph.initializer if x.name == "embeddings.word_embeddings.weight")
        table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table)[: highest + 1], table.name))
        onnx.save(model, str(tmp / "model.onnx"))
        files = {"model.onnx": (tmp / "model.onnx", "model")}
        for f in m.files:
            if f.role != "model":  # copies: publish moves its files into the store
                files[f.path] = (Path(shutil.copy(src.blob_path(f.digest), tmp / f.path.replace("/", "_"))), f.role)
        store.publish(replace(m, name=DEFAULT, version="1"), files)
    return store, f"hello {word}"


async def status(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/api/status") as r:
        body: dict[str, Any] = await r.json()
        return body


async def until(s: aiohttp.ClientSession, url: str, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await status(s, url)
        if check(st):
            return st
        await asyncio.sleep(0.3)
    raise AssertionError(f"not reached within {timeout} s: {st}")


def serving(st: dict[str, Any]) -> dict[str, Any]:
    return {m["name"]: m for m in st["models"]}.get(NAME, {})


async def test_a_subscribed_tag_is_followed_safely(store_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "edge.key"
    generate_key(key)
    state = tmp_path / "state"
    (state / "trust").mkdir(parents=True)
    shutil.copy(tmp_path / "edge.key.pub", state / "trust")
    broken = broken_store(store_dir, tmp_path / "broken")
    codes: dict[int, int] = {}
    stop = asyncio.Event()

    async def traffic(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(url + "/v1/embeddings", json={"model": NAME, "input": "hello"}) as r:
                    codes[r.status] = codes.get(r.status, 0) + 1
                    await r.read()

    with docker_registry(tmp_path / "registry") as reg:
        tag = f"{reg.host}/models/minilm:stable"

        async def publish(store: ModelStore, name: str) -> str:
            async with aiohttp.ClientSession() as s:
                registry = Registry(reg.host, s)
                digest = (await push(store, name, None, parse_reference(tag), registry)).digest
                await sign(registry, "models/minilm", digest, load_private(key), tmp_path)
                return digest

        first = await publish(ModelStore(store_dir), DEFAULT)
        env = {
            "LLMOSD_SEED_DEFAULTS": "false",
            "LLMOSD_AUTOTUNE": "false",
            "LLMOSD_SUBSCRIPTIONS": f"{tag}={NAME}",
            "LLMOSD_SYNC_INTERVAL_S": "1",
            "LLMOSD_PROBATION_S": "2",
            "LLMOSD_KEEP_VERSIONS": "2",
        }
        d = start_daemon(state, tmp_path, env=env)
        try:
            async with aiohttp.ClientSession() as s:
                st = await until(s, d.url, lambda st: st["sync"][0]["digest"] == first)  # after its probation
                assert serving(st)["version"] == "1" and st["sync"][0]["error"] is None

                load = [asyncio.create_task(traffic(d.url)) for _ in range(4)]
                await asyncio.sleep(1)
                second = await publish(ModelStore(store_dir), "minilm-fp32")
                st = await until(s, d.url, lambda st: st["sync"][0]["digest"] == second)
                assert (serving(st)["version"], serving(st)["precision"]) == ("2", "fp32")

                third = await publish(broken, DEFAULT)
                st = await until(s, d.url, lambda st: third in st["sync"][0]["refused"])
                assert "smoke test failed" in st["sync"][0]["refused"][third]
                assert serving(st)["version"] == "2" and st["sync"][0]["digest"] == second
                await asyncio.sleep(1)
                stop.set()
                await asyncio.gather(*load)
                assert codes.get(200, 0) > 20 and set(codes) == {200}  # nothing failed through all of it
                assert ModelStore(state).versions(NAME) == ["1", "2"]  # the refused one is gone
        except BaseException:
            d.stop()
            raise
    # the registry is gone now: the daemon serves on and says when the last check succeeded
    try:
        async with aiohttp.ClientSession() as s:
            st = await until(s, d.url, lambda st: st["sync"][0]["error"] is not None)
            assert st["sync"][0]["last_success"] is not None and serving(st)["version"] == "2"
            async with s.post(d.url + "/v1/embeddings", json={"model": NAME, "input": "still here"}) as r:
                assert r.status == 200
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert "failed its smoke test" in log and "the current version keeps serving" in log


async def test_a_version_that_fails_real_traffic_is_rolled_back(store_dir: Path, tmp_path: Path) -> None:
    """It passes the smoke test and every health probe, but real requests fail on it: more than
    ``probation_max_error_rate`` of them in probation rolls it back, and the old version serves again."""
    picky, text = picky_store(store_dir, tmp_path / "picky", ["smoke test", "a second input", "health probe"])
    codes: list[int] = []
    stop = asyncio.Event()

    async def traffic(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(url + "/v1/embeddings", json={"model": NAME, "input": text}) as r:
                    codes.append(r.status)
                    await r.read()
                await asyncio.sleep(0.02)

    with docker_registry(tmp_path / "registry") as reg:
        tag = f"{reg.host}/models/minilm:stable"

        async def publish(store: ModelStore, name: str) -> str:
            async with aiohttp.ClientSession() as s:
                return (await push(store, name, None, parse_reference(tag), Registry(reg.host, s))).digest

        first = await publish(ModelStore(store_dir), "minilm-fp32")
        env = {
            "LLMOSD_SEED_DEFAULTS": "false",
            "LLMOSD_AUTOTUNE": "false",
            "LLMOSD_SUBSCRIPTIONS": f"{tag}={NAME}",
            "LLMOSD_ALLOW_UNSIGNED_FROM": reg.host,
            "LLMOSD_SYNC_INTERVAL_S": "1",
            "LLMOSD_PROBATION_S": "8",
        }
        d = start_daemon(tmp_path / "state", tmp_path, env=env)
        try:
            async with aiohttp.ClientSession() as s:
                await until(s, d.url, lambda st: st["sync"][0]["digest"] == first)
                load = [asyncio.create_task(traffic(d.url)) for _ in range(2)]
                await asyncio.sleep(1)
                assert codes and set(codes) == {200}  # the first version answers it
                bad = await publish(picky, DEFAULT)
                st = await until(s, d.url, lambda st: bad in st["sync"][0]["refused"])
                reason = st["sync"][0]["refused"][bad]
                assert "failed on probation" in reason and "requests failed" in reason, reason
                assert serving(st)["version"] == "1" and st["sync"][0]["digest"] == first
                during = len(codes)
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.gather(*load)
        finally:
            assert d.stop() == 0
    assert 500 in codes[:during]  # the picky version failed them while in probation...
    assert set(codes[during:]) == {200}  # ...and after the rollback they pass again
    log = d.log.read_text()
    assert "failed on probation" in log and "rolling back to 1" in log
