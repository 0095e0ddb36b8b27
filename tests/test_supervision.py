"""Supervision of the workers, with faults injected into real ones (real ONNX Runtime sessions): each kind
of worker killed at each stage of its loop fails what it held with a 503 (no request hangs), reports
itself down, is restarted and serves again while the other models keep serving; one that keeps dying is
unloaded and reported. Then the same through a real daemon's /readyz, /api/status and /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmosd.hardware import probe
from llmosd.runtime import Loader, ProviderSelector
from llmosd.runtime.chat import Message
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.sampling import SamplingParams
from llmosd.scheduler import BatchPolicy, GenerationRequest, ModelPool
from llmosd.scheduler.faults import InjectedFault, inject
from llmosd.scheduler.served import ServedModel
from llmosd.scheduler.supervisor import MAX_DEATHS, WorkerDied
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import DEFAULT, SMOLLM2, start_daemon, store_with

TIMEOUT = 30  # far past any request here: reaching it means a request hung


@pytest.fixture(scope="module")
async def pool(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ModelPool]:
    store = ModelStore(store_with(store_dir, tmp_path_factory.mktemp("sup-store"), (DEFAULT, SMOLLM2)))
    p = ModelPool(
        store, probe(), Loader(ProviderSelector("cpu", 1, False), discover().adapters()), BatchPolicy(max_batch=4)
    )
    await p.load(DEFAULT)
    await p.load(SMOLLM2)
    yield p
    await p.close()


def embed(served: ServedModel) -> Awaitable[Any]:
    return served.infer(["a sentence to embed"])


async def generate(served: ServedModel) -> str:
    model = served.loaded.backend
    assert isinstance(model, TextGenerator)
    prompt = tuple(model.render_chat([Message("user", "Hello there")]))
    stream = served.generator.submit(GenerationRequest(prompt, SamplingParams(temperature=0), 8, ignore_eos=True))
    return await stream.text()


def tensors(served: ServedModel) -> Awaitable[Any]:
    ids = np.array([[101, 7592, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in {i.name for i in served.loaded.session.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return served.infer_tensors(feeds, 8, 64)


KINDS: dict[str, tuple[str, Callable[[ServedModel], Awaitable[Any]]]] = {
    "batcher": (DEFAULT, embed),
    "generation": (SMOLLM2, generate),
    "tensors": (DEFAULT, tensors),
}


def worker_of(served: ServedModel, kind: str) -> Any:
    instance = served.raw[0] if kind == "tensors" else served.instances[0]
    assert instance.worker.role == kind
    return instance.worker


async def recovered(served: ServedModel, kind: str, restarts: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    sup = worker_of(served, kind).supervisor
    while not (sup.healthy and sup.restarts >= restarts):
        assert time.monotonic() < deadline, f"{kind} never came back: {sup.status()}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("stage", ["collect", "run", "deliver"])
@pytest.mark.parametrize("kind", ["batcher", "generation", "tensors"])
async def test_a_worker_killed_at_any_stage_fails_its_requests_and_comes_back(
    pool: ModelPool, kind: str, stage: str
) -> None:
    name, call = KINDS[kind]
    other_name, other_call = KINDS["generation" if kind != "generation" else "batcher"]
    served, other = pool.get(name), pool.get(other_name)
    await asyncio.wait_for(call(served), TIMEOUT)  # starts the tensor batcher on first use
    sup = worker_of(served, kind).supervisor
    before = sup.restarts
    inject(worker_of(served, kind), stage)
    # A burst: the fault fires on the first step that reaches the stage; every request ends, in an
    # answer or a WorkerDied (the API's 503), none hangs.
    results = await asyncio.wait_for(asyncio.gather(*(call(served) for _ in range(6)), return_exceptions=True), TIMEOUT)
    died = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, WorkerDied) for r in died), died
    if stage != "collect":  # the request the fault hit was held by the worker: it failed, not hung
        assert died
    await recovered(served, kind, before + 1)
    assert sup.restarts == before + 1 and "InjectedFault" in (sup.last_error or "")
    await asyncio.wait_for(call(served), TIMEOUT)  # serving again
    await asyncio.wait_for(other_call(other), TIMEOUT)  # the other model never stopped


async def test_a_dead_worker_is_down_until_restarted(pool: ModelPool) -> None:
    served = pool.get(DEFAULT)
    batcher = worker_of(served, "batcher")
    inject(batcher, "run")
    with pytest.raises(WorkerDied, match="died"):
        await asyncio.wait_for(embed(served), TIMEOUT)
    # Right after the death, before the backoff ends: down, and refused at once.
    assert not served.healthy() and not batcher.supervisor.healthy
    with pytest.raises(WorkerDied, match="restarting"):
        await embed(served)
    await recovered(served, "batcher", batcher.supervisor.restarts + 1)
    assert served.healthy()
    assert served.instances[0].status()["workers"]["batcher"]["healthy"] is True  # type: ignore[index]


async def test_a_worker_that_keeps_dying_is_unloaded_and_reported(pool: ModelPool) -> None:
    served = pool.get(DEFAULT)
    inject(worker_of(served, "batcher"), "collect", times=MAX_DEATHS + 1)
    # Wakes the worker (answered, or failed with WorkerDied); it dies at every collect from then on.
    await asyncio.wait_for(asyncio.gather(embed(served), embed(served), return_exceptions=True), TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while DEFAULT not in pool.failures:
        assert time.monotonic() < deadline, "the pool never gave up on the model"
        await asyncio.sleep(0.05)
    assert f"died {MAX_DEATHS + 1} times" in pool.failures[DEFAULT]
    while DEFAULT in {s.name for s in pool.served()}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.wait_for(generate(pool.get(SMOLLM2)), TIMEOUT)  # the other model serves on
    # A later request loads it afresh (a new worker, no fault) and the report clears.
    fresh = await pool.acquire(DEFAULT)
    try:
        await asyncio.wait_for(embed(fresh), TIMEOUT)
    finally:
        pool.release(fresh)
    assert DEFAULT not in pool.failures


def test_injected_faults_are_base_exceptions() -> None:
    # Not an Exception: no ``except Exception`` in a worker can swallow it, as with a native crash.
    assert not issubclass(InjectedFault, Exception)


async def test_readiness_status_and_metrics_follow_a_dying_worker(
    store_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store = store_with(store_dir, tmp_path_factory.mktemp("sup-daemon-store"), (DEFAULT, SMOLLM2))
    env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false"}
    env["LLMOSD_DEBUG_API"] = "true"
    d = start_daemon(store, tmp_path_factory.mktemp("sup-daemon"), env=env)
    try:
        async with aiohttp.ClientSession(d.url) as s:
            fault = {"model": DEFAULT, "worker": "batcher", "stage": "collect", "times": 5}
            async with s.post("/api/debug/fault", json=fault) as r:
                assert r.status == 200, await r.text()
            async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "wake it"}) as r:
                assert r.status in (200, 503)  # the worker dies at its next collect, after this batch
            seen_down = {"readyz": False, "status": False, "metrics": False}
            deadline = time.monotonic() + TIMEOUT
            while not all(seen_down.values()):  # five deaths, backoffs 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s
                assert time.monotonic() < deadline, f"never seen down: {seen_down}"
                async with s.get("/readyz") as r:
                    if r.status == 503:
                        assert "worker died" in (await r.json())["error"]["message"]
                        seen_down["readyz"] = True
                async with s.get("/api/status") as r:
                    model = next(m for m in (await r.json())["models"] if m["name"] == DEFAULT)
                    seen_down["status"] |= model["instances"][0]["healthy"] is False
                async with s.get("/metrics") as r:
                    seen_down["metrics"] |= _ready_gauge(await r.text(), DEFAULT) == 0
                async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "meanwhile"}) as r:
                    assert r.status in (200, 503)
                    if r.status == 503:
                        assert "Retry-After" in r.headers and "died" in (await r.json())["error"]["message"]
                async with s.post("/v1/completions", json={"model": SMOLLM2, "prompt": "Hi", "max_tokens": 2}) as r:
                    assert r.status == 200  # the other model keeps serving
            while True:  # and back
                assert time.monotonic() < deadline, "never came back"
                async with s.get("/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            async with s.post("/v1/embeddings", json={"model": DEFAULT, "input": "back"}) as r:
                assert r.status == 200
            async with s.get("/metrics") as r:
                text = await r.text()
            assert _ready_gauge(text, DEFAULT) == 1
            restarts = _sample(text, "llmosd_worker_restarts_total", DEFAULT)
            assert restarts == 5
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    log = d.log.read_text()
    assert log.count("worker batch-all-minilm-l6-v2 died: InjectedFault") == 5


def _sample(text: str, name: str, model: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    return None


def _ready_gauge(text: str, model: str) -> float | None:
    return _sample(text, "llmosd_model_ready", model)


async def test_counters_are_updated_before_the_tokens_are_delivered(pool: ModelPool) -> None:
    """Issue 12's race: a scrape right after a response read one token fewer than it had. At every
    hand-off of chunks to the loop the engine's counters must already hold them."""
    engine = worker_of(pool.get(SMOLLM2), "generation")
    delivered: dict[int, int] = {}
    finished = 0
    behind: list[str] = []
    original = engine._deliver

    def checked(items: list[Any]) -> None:
        nonlocal finished
        for seq, chunk in items:
            delivered[id(seq)] = chunk.completion_tokens
            finished += chunk.finish_reason is not None
        if engine.stats.generated_tokens < sum(delivered.values()):
            behind.append(f"{engine.stats.generated_tokens} tokens counted, {sum(delivered.values())} delivered")
        if engine.stats.completed < finished:
            behind.append(f"{engine.stats.completed} completed counted, {finished} delivered")
        original(items)

    base_tokens, base_completed = engine.stats.generated_tokens, engine.stats.completed
    delivered[0] = base_tokens  # what earlier tests generated
    finished = base_completed
    engine._deliver = checked
    try:
        await asyncio.wait_for(asyncio.gather(*(generate(pool.get(SMOLLM2)) for _ in range(4))), TIMEOUT)
    finally:
        del engine._deliver
    assert not behind, behind[:3]
    assert engine.stats.generated_tokens == base_tokens + 4 * 8
