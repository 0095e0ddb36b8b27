"""Batch autotuning: the pure decisions, a calibration on the real CPU, the cache, and the daemon."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from llmosd.hardware import probe
from llmosd.hardware.autotune import BatchProfile, ProfileCache, Trial, calibrate, choose, memory_bound
from llmosd.runtime import ProviderSelector, load
from llmosd.scheduler.tuning import Tuner, TuningPolicy
from llmosd.store import ModelStore
from tests.conftest import DEFAULT, Daemon, llmosd

GB = 1 << 30


def test_memory_bound_leaves_headroom_and_never_goes_below_one() -> None:
    assert memory_bound(16 * GB, 1 * GB, 100 << 20) == 120  # (16 x 0.8 - 1) GB / 100 MB
    assert memory_bound(64 * GB, 1 * GB, 1 << 20) == 256  # capped at the largest size tried
    assert memory_bound(4 * GB, 1 * GB, 100 << 20) == 22  # (3.2 - 1) GB / 100 MB
    assert memory_bound(4 * GB, 3 * GB, 100 << 20) == 2
    assert memory_bound(4 * GB, 5 * GB, 100 << 20) == 1  # a fake 4 GB GPU: nothing spare, batch 1 at most


def test_choose_takes_the_best_throughput_within_the_budget() -> None:
    trials = [Trial(1, 5, 200), Trial(2, 6, 333), Trial(4, 9, 444), Trial(8, 30, 266), Trial(16, 90, 177)]
    assert choose(trials, 10)[0] == 4
    assert choose(trials, 100)[0] == 4  # bigger is not better once throughput falls
    size, why = choose(trials, 1)
    assert size == 1 and "no size met" in why
    assert "[8, 16] exceeded" in choose(trials, 10)[1]


def test_calibrate_stops_past_twice_the_budget() -> None:
    calls: list[int] = []

    def run(batch: int) -> None:  # 2 ms fixed + 1 ms per input
        calls.append(batch)
        time.sleep(0.002 + 0.001 * batch)

    trials = calibrate(run, bound=256, budget_ms=20, repeats=1)
    assert [t.batch for t in trials] == [1, 2, 4, 8, 16, 32, 64]  # 64 takes 66 ms > 2 x 20: stop there
    assert choose(trials, 20)[0] == 16 and max(calls) == 64
    assert [t.batch for t in calibrate(run, bound=4, budget_ms=1000, repeats=1)] == [1, 2, 4]


def test_tuning_minilm_on_this_cpu_is_cached_and_near_the_best(store_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(store_dir)
    loaded = load(store, store.manifest(DEFAULT), ProviderSelector("cpu", 2, False))
    tuner = Tuner(store, probe(), TuningPolicy(latency_budget_ms=400, seq_len=64))
    tuner.cache = ProfileCache(tmp_path)  # not the session store's own cache
    profile = tuner.tune(loaded)
    assert len(profile.trials) >= 3 and profile.device == "cpu" and profile.seq_len == 64
    assert profile.chosen in [t.batch for t in profile.trials if t.latency_ms <= 400]
    cached = tuner.cached(loaded)
    assert cached == profile
    digest = next(f.digest for f in loaded.manifest.files if f.role == "model")
    assert (tmp_path / "profiles" / digest.replace(":", "-") / "cpu.json").is_file()
    stale = replace(profile, hardware="cpu|another box|64 cores|onnxruntime 1.0")
    tuner.cache.put(stale)
    assert tuner.cached(loaded) is None  # measured elsewhere: tune again
    # Re-measured, interleaved so the VM's drift hits every size alike: the choice is within 10 % of the best.
    # The tuner and this check measure at different moments of a shared 2-core VM, whose speed wanders by
    # more than 10 % at times (seen once in CI: 0.78): a second, independent tune-and-check is allowed,
    # and both failing fails the test.
    ratios = []
    for attempt in range(2):
        chosen = profile.chosen if attempt == 0 else tuner.tune(loaded).chosen
        ratios.append(_chosen_vs_best(loaded, chosen, [t.batch for t in profile.trials if t.latency_ms <= 400]))
        if ratios[-1] >= 0.9:
            break
    assert ratios[-1] >= 0.9, ratios


def _chosen_vs_best(loaded: Any, chosen: int, sizes: list[int]) -> float:
    backend = loaded.backend
    encoding = backend.prepare(["the quick brown fox " * 16])[0]
    sizes = sorted({*sizes, chosen})
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(9):
        for b in sizes:
            t0 = time.perf_counter()
            backend.run([encoding] * b)
            rates[b].append(b / (time.perf_counter() - t0))
    best = max(statistics.median(r) for r in rates.values())
    return statistics.median(rates[chosen]) / best


async def test_the_daemon_tunes_in_the_background_and_shows_why(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        profile = None
        for _ in range(300):
            async with s.get(daemon.url + "/api/hardware") as r:
                placed = {p["model"]: p for p in (await r.json())["placements"]}
            profile = placed[DEFAULT]["batch_profile"]
            if profile:
                break
            await asyncio.sleep(0.2)
        assert profile is not None and profile["reason"].startswith(f"batch {profile['chosen']}")
        async with s.get(daemon.url + "/api/status") as r:
            status = {m["name"]: m for m in (await r.json())["models"]}
        instance = status[DEFAULT]["instances"][0]
        assert instance["max_batch"] == profile["chosen"] and instance["tuned"] == profile["reason"]
    r = llmosd("tune", DEFAULT, "--socket", str(daemon.socket), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    again = BatchProfile.from_dict(json.loads(r.stdout))
    assert again.model == f"{DEFAULT}:1" and again.trials
    # a causal LM: rows decoded together, bounded by max_sequences (16) and the KV budget
    r = llmosd("tune", "smollm2-135m-instruct", "--socket", str(daemon.socket), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = BatchProfile.from_dict(json.loads(r.stdout))
    assert [t.batch for t in rows.trials][:3] == [1, 2, 4] and rows.memory_bound == 16 and "tokens/s" in rows.reason
    assert rows.trials[-1].throughput > rows.trials[0].throughput  # batching decode pays on this CPU
    async with aiohttp.ClientSession() as s, s.get(daemon.url + "/api/status") as resp:
        status = {m["name"]: m for m in (await resp.json())["models"]}
    assert status["smollm2-135m-instruct"]["instances"][0]["max_sequences"] == rows.chosen
