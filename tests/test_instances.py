"""Several instances of a model: where placement puts them (fake GPUs injected at the probe boundary),
real instances sharing the CPU, requests spread over them, and a daemon reporting them."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmosd.runtime import Loader, ProviderSelector
from llmosd.scheduler import BatchPolicy, DynamicBatcher, ModelPool
from llmosd.scheduler.placement import Ledger, PlacementError, need_bytes
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import DEFAULT, start_daemon
from tests.test_placement import GB, box

FP32 = "minilm-fp32"  # int8 activations are quantised per batch: results depend on the batch
SENTENCES = [f"sentence number {i} about the weather in spring" for i in range(40)]


def test_plan_puts_instances_on_every_gpu_with_room_else_on_the_cpu() -> None:
    ledger = Ledger.from_hardware(box(cpu_free=16 * GB, gpus=(3 * GB, 8 * GB, 1 * GB)))
    devices = ["cuda:1", "cuda:0", "cuda:2", "cpu"]  # candidates' order: roomiest GPU first
    assert ledger.plan("m", 2 * GB, devices, 1) == ["cuda:1", "cuda:0"]  # cuda:2 has 1 GB: no instance there
    assert ledger.plan("m", 2 * GB, devices, 3) == ["cuda:1", "cuda:1", "cuda:1", "cuda:0"]  # 3 fit in 8 GB
    assert ledger.plan("m", 10 * GB, devices, 2) == ["cpu"]  # no GPU has room: the CPU, as many as fit
    assert ledger.plan("m", 4 * GB, ["cpu"], 2) == ["cpu", "cpu"]
    ledger.reserve("other", "cuda:1", 7 * GB)
    ledger.reserve("other", "cuda:1", 0)  # a second instance of the same model adds to the first
    assert ledger.used["cuda:1"] == {"other": 7 * GB}
    assert ledger.plan("m", 2 * GB, devices, 2) == ["cuda:0"]
    with pytest.raises(PlacementError, match=r"needs 20,480 MB and fits on no device: free cuda:1 1,024 MB"):
        ledger.plan("m", 20 * GB, devices, 1)


def test_an_instance_placed_on_a_gpu_whose_provider_does_not_load_says_so() -> None:
    from llmosd.runtime.providers import PROBE_MODEL

    # onnxruntime-gpu on this CPU-only box: CUDA is listed but does not load, so cuda:1 falls back
    selector = ProviderSelector("auto", 1, False, cuda="fails")
    session, placement = selector.create(PROBE_MODEL, ("cpu", "cuda"), "cuda:1", 1)
    assert placement.device == "cpu" and placement.threads == 1
    assert placement.note == "placed on cuda:1, but the CUDA provider does not load: running on cpu"
    assert session.get_providers() == ["CPUExecutionProvider"]


async def test_two_instances_share_the_cpu_split_its_threads_and_both_serve(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    need = need_bytes(store.manifest(FP32), 0)
    hardware, sessions = box(cpu_free=16 * GB), Loader(ProviderSelector("cpu", 2, False), discover().adapters())
    single = ModelPool(store, hardware, sessions, BatchPolicy())
    pool = ModelPool(store, hardware, sessions, BatchPolicy(), instances=2)
    try:
        reference = await (await single.load(FP32)).infer(SENTENCES[:4])
        served = await pool.load(FP32)
        assert served.devices == ["cpu", "cpu"]
        assert [i.loaded.placement.threads for i in served.instances] == [1, 1]  # 2 threads split
        assert pool.ledger is not None and pool.ledger.used["cpu"] == {f"{FP32}:1": 2 * need}
        results = await asyncio.gather(*(served.infer([s]) for s in SENTENCES))
        counts = [i.worker.stats.requests for i in served.instances if isinstance(i.worker, DynamicBatcher)]
        assert sum(counts) == len(SENTENCES) and min(counts) > 0  # both instances took work
        for got, want in zip(results[:4], reference, strict=True):
            np.testing.assert_allclose(got[0].values, want.values, atol=1e-4)  # fp32: batch composition is float noise
        status = served.status()
        assert status["devices"] == ["cpu", "cpu"] and len(status["instances"]) == 2  # type: ignore[arg-type]
        await pool.unload(FP32)
        assert pool.ledger.used["cpu"] == {}
    finally:
        await pool.close()
        await single.close()


async def test_fake_gpus_get_one_instance_each_and_the_ledger_counts_where_they_really_landed(
    store_dir: Path,
) -> None:
    store = ModelStore(store_dir)
    name = "minilm-fp32"  # an artifact for CPU and CUDA (int8 encoders are CPU-only: per-token int8)
    need = need_bytes(store.manifest(name), 0)
    hardware = box(cpu_free=16 * GB, gpus=(6 * GB, 8 * GB))  # the probe says CUDA loads
    pool = ModelPool(
        store, hardware, Loader(ProviderSelector("auto", 2, False, hardware.cuda), discover().adapters()), BatchPolicy()
    )
    try:
        served = await pool.load(name)
        # planned on cuda:1 (roomiest) and cuda:0; the real provider does not load here, so both run on the
        # CPU, say so, and are accounted there rather than on GPUs they never reached
        notes = [i.loaded.placement.note for i in served.instances]
        assert notes == [
            f"placed on {d}, but the CUDA provider does not load: running on cpu" for d in ("cuda:1", "cuda:0")
        ]
        assert served.devices == ["cpu", "cpu"]
        assert pool.ledger is not None and pool.ledger.used == {"cpu": {f"{name}:1": 2 * need}}
    finally:
        await pool.close()


async def test_a_daemon_with_two_instances_reports_them_in_status_hardware_and_metrics(
    store_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    for name in ("minilm-fp32", "tiny-clf", "smollm2-135m-instruct"):
        shutil.rmtree(state / "models" / name)
    env = {"LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_INSTANCES": "2"}
    d = start_daemon(state, tmp_path, env=env)
    try:
        async with aiohttp.ClientSession() as s:
            bodies = [{"model": DEFAULT, "input": [t]} for t in SENTENCES]
            replies = await asyncio.gather(*(s.post(d.url + "/v1/embeddings", json=b) for b in bodies))
            assert [r.status for r in replies] == [200] * len(SENTENCES)
            async with s.get(d.url + "/api/status") as r:
                model = next(m for m in (await r.json())["models"] if m["name"] == DEFAULT)
            async with s.get(d.url + "/api/hardware") as r:
                placements = [p for p in (await r.json())["placements"] if p["model"] == DEFAULT]
            async with s.get(d.url + "/metrics") as r:
                families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        assert model["devices"] == ["cpu", "cpu"]
        requests = [i["batcher"]["requests"] for i in model["instances"]]
        assert sum(requests) == len(SENTENCES) and min(requests) > 0
        assert [(p["instance"], p["device"]) for p in placements] == [(0, "cpu"), (1, "cpu")]
        info = [x for x in families["llmosd_model_info"].samples if x.labels["model"] == DEFAULT]
        assert [(x.labels["device"], x.value) for x in info] == [("cpu", 2.0)]
        items = [x for x in families["llmosd_inference_items"].samples if x.labels["model"] == DEFAULT]
        assert items[0].value == len(SENTENCES)
        runs = [
            x
            for x in families["llmosd_inference_seconds"].samples
            if x.labels.get("model") == DEFAULT and x.name.endswith("_count")
        ]
        assert len(runs) == 1 and runs[0].value == sum(i["batcher"]["batches"] for i in model["instances"])
    finally:
        d.stop()
