"""Placement: the per-device memory ledger, refusal with a clear message, least-recently-used unloading;
with fake hardware injected at the probe boundary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from llmosd.hardware import CpuInfo, GpuInfo, Hardware, ProviderStatus
from llmosd.runtime import Loader, ProviderSelector
from llmosd.scheduler import BatchPolicy, ModelPool
from llmosd.scheduler.placement import LOAD_FACTOR, WORKSPACE, Ledger, PlacementError, candidates, need_bytes
from llmosd.store import IntegrityError, ModelStore
from llmosd.tasks import discover
from tests.conftest import DEFAULT, SMOLLM2

MB = 1 << 20
GB = 1 << 30


def box(cpu_free: int, gpus: tuple[int, ...] = (), cuda: bool = True) -> Hardware:
    cpu = CpuInfo("Fake CPU", "x86_64", 8, 16, ("avx2",), 64 * GB, cpu_free)
    cards = tuple(GpuInfo(i, "Fake GPU", f"GPU-{i}", free, free, (8, 9), False) for i, free in enumerate(gpus))
    providers = (ProviderStatus("CUDAExecutionProvider", cuda), ProviderStatus("CPUExecutionProvider", True))
    return Hardware(cpu, cards, "550", "12.4", "ok", providers)


def test_the_ledger_places_on_the_roomiest_gpu_then_the_cpu_and_refuses_clearly(store_dir: Path) -> None:
    # SmolLM2's fused graph is CPU-only; the ledger's logic is what is tested: as an artifact for both
    m = replace(ModelStore(store_dir).manifest(SMOLLM2), devices=("cpu", "cuda"))
    need = need_bytes(m, 1 * GB)
    weights = sum(f.size for f in m.files if f.role in ("model", "model-data"))  # the graph and its weights
    resident = m.recipe["resident_bytes"]  # measured by the exporter on a CPU session of the graph
    assert need == resident + GB and weights <= resident <= 3 * weights
    legacy = replace(m, recipe={k: v for k, v in m.recipe.items() if k != "resident_bytes"})
    assert need_bytes(legacy, GB) == int(weights * LOAD_FACTOR) + GB  # a manifest without the measurement
    hw = box(cpu_free=8 * GB, gpus=(2 * GB, 6 * GB))
    assert candidates(m, hw) == ["cuda:1", "cuda:0", "cpu"]
    assert candidates(m, box(8 * GB, (6 * GB,), cuda=False)) == ["cpu"]  # CUDA does not load: CPU only
    assert candidates(replace(m, devices=("cuda",)), box(8 * GB)) == []  # an fp16 artifact on a CPU box
    ledger = Ledger.from_hardware(hw)
    assert ledger.place("a", need, candidates(m, hw)) == "cuda:1"
    ledger.reserve("a", "cuda:1", 5 * GB)
    assert ledger.place("b", need, candidates(m, hw)) == "cuda:0"
    small = Ledger.from_hardware(box(cpu_free=1 * GB, gpus=(4 * GB,)))
    with pytest.raises(PlacementError) as err:
        small.place("big", 9 * GB, ["cuda:0", "cpu"])
    assert str(err.value) == "model 'big' needs 9,216 MB and fits on no device: free cuda:0 4,096 MB, cpu 1,024 MB"


async def test_least_recently_used_models_make_room_and_pinned_ones_stay(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    fp32, int8 = (need_bytes(store.manifest(n), 0) for n in ("minilm-fp32", DEFAULT))
    # room for one of them, not both
    pool = ModelPool(
        store,
        box(cpu_free=fp32 + int8 // 2),
        Loader(ProviderSelector("cpu", 1, False), discover().adapters()),
        BatchPolicy(),
    )
    try:
        await pool.load("minilm-fp32")
        await pool.load(DEFAULT)  # minilm-fp32 is the least recently used: unloaded to make room
        assert [s.loaded.name for s in pool.served()] == [DEFAULT]
        assert pool.ledger is not None and pool.ledger.used["cpu"] == {f"{DEFAULT}:1": int8}
        pool.pinned = {DEFAULT}
        with pytest.raises(PlacementError, match="fits on no device"):
            await pool.load("minilm-fp32")
        assert [s.loaded.name for s in pool.served()] == [DEFAULT]
        assert int8 == store.manifest(DEFAULT).recipe["resident_bytes"] + WORKSPACE
    finally:
        await pool.close()


async def test_a_smoke_test_is_placed_by_the_ledger_and_leaves_nothing_reserved(
    store_dir: Path, tmp_path: Path
) -> None:
    """The sync's smoke test of a version that does not serve yet goes through the pool: it must fit beside
    what serves (or make room the same way), and whatever happens it leaves the ledger as it was."""
    import shutil

    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    store = ModelStore(state)
    fp32, int8 = (need_bytes(store.manifest(n), 0) for n in ("minilm-fp32", DEFAULT))
    pool = ModelPool(
        store,
        box(cpu_free=int8 + fp32 // 2),
        Loader(ProviderSelector("cpu", 1, False), discover().adapters()),
        BatchPolicy(),
    )
    try:
        await pool.load(DEFAULT)
        pool.pinned = {DEFAULT}
        held = dict(pool.ledger.used["cpu"]) if pool.ledger else {}
        with pytest.raises(PlacementError, match="fits on no device"):  # no room beside the pinned default
            await pool.smoke_test("minilm-fp32", "1")
        assert pool.ledger is not None
        pool.ledger.capacity["cpu"] += fp32
        await pool.smoke_test("minilm-fp32", "1")  # room now: it loads, runs on a sample, and goes
        assert pool.ledger.used["cpu"] == held
        blob = store.blob_path(next(f.digest for f in store.manifest("minilm-fp32").files if f.role == "model"))
        blob.chmod(0o644)
        blob.write_bytes(b"not an onnx graph")
        with pytest.raises(IntegrityError):
            await pool.smoke_test("minilm-fp32", "1")
        assert pool.ledger.used["cpu"] == held and [s.name for s in pool.served()] == [DEFAULT]
    finally:
        await pool.close()


INJECTED = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    import aiohttp
    from llmosd.config import load_config
    from llmosd.daemon import serve
    from llmosd.hardware import CpuInfo, GpuInfo, Hardware, ProviderStatus

    GB = 1 << 30

    def fake():  # a 4 GB GPU and 1 GB of free CPU memory
        cpu = CpuInfo("Fake CPU", "x86_64", 4, 8, ("avx2",), 8 * GB, 1 * GB)
        gpu = GpuInfo(0, "Fake 4 GB GPU", "GPU-0", 4 * GB, 4 * GB, (7, 5), False)
        providers = (ProviderStatus("CUDAExecutionProvider", True), ProviderStatus("CPUExecutionProvider", True))
        return Hardware(cpu, (gpu,), "550", "12.4", "ok", providers)

    async def main():
        cfg = load_config({"state_dir": sys.argv[1], "socket": sys.argv[2], "host": "none", "seed_defaults": False,
                           "kv_cache_mb": 8192, "autotune": False}, {})
        task = asyncio.create_task(serve(cfg, probe_hardware=fake))
        while True:
            await asyncio.sleep(0.2)
            try:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sys.argv[2])) as s:
                    async with s.get("http://x/api/status") as r:
                        status = await r.json()
                    if status["status"] not in ("starting",) and not status["status"].startswith("loading"):
                        async with s.get("http://x/api/hardware") as r:
                            print(json.dumps({"status": status, "hardware": await r.json()}))
                        break
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        await task

    asyncio.run(main())
""")


def test_a_model_too_big_for_a_fake_4gb_gpu_and_the_cpu_is_refused_with_the_numbers(
    store_dir: Path, tmp_path: Path
) -> None:
    import shutil

    state = tmp_path / "state"
    shutil.copytree(store_dir, state, symlinks=True)
    for name in ("minilm-fp32", "tiny-clf"):
        shutil.rmtree(state / "models" / name)
    r = subprocess.run(
        [sys.executable, "-c", INJECTED, str(state), str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    line = out["status"]["status"]
    # the fused graph is built for the CPU provider: the fake GPU is no candidate for it
    assert f"model '{SMOLLM2}:1' needs" in line and "fits on no device: free cpu" in line
    loaded = [m["name"] for m in out["status"]["models"]]
    assert loaded == [DEFAULT]  # the small model still loads; the big one is refused, nothing else changes
    memory = out["hardware"]["memory"]
    assert memory["cuda:0"]["capacity"] == 4 * GB and list(memory["cpu"]["models"]) == [f"{DEFAULT}:1"]
