"""Batch autotuning: the pure decisions, a calibration on the real CPU, the cache, and the daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

from llmosd.hardware import probe
from llmosd.hardware.autotune import (
    BatchProfile,
    LoadMeter,
    ProfileCache,
    Sample,
    Trial,
    calibrate,
    choose,
    fit_cost,
    memory_bound,
)
from llmosd.runtime import ProviderSelector, load
from llmosd.scheduler.tuning import Tuner, TuningPolicy
from llmosd.store import ModelStore
from llmosd.tasks import discover
from tests.conftest import DEFAULT, SMOLLM2, Daemon, llmosd

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


def test_the_cost_model_is_fitted_to_the_timings() -> None:
    def ms(n: int, length: int) -> float:  # 2 ms fixed, 10 us a token, 0.05 us a token pair
        return 2.0 + n * length * (0.01 + 0.00005 * length)

    samples = [Sample(n, length, ms(n, length)) for length in (16, 64, 128) for n in (1, 2, 4, 8, 16, 32)]
    cost = fit_cost(samples, budget_ms=1000)
    assert cost is not None
    assert abs(cost.fixed_ms - 2.0) < 1e-6 and abs(cost.token_ms - 0.01) < 1e-9 and abs(cost.token_sq_ms - 5e-5) < 1e-9
    # Throughput (tokens/ms) grows with the run's size, then flattens: the cap is where it gets within
    # 5 % of the best measured, here 16 x 128 tokens (32 x 128 is over the budget).
    capped = fit_cost(samples, budget_ms=ms(16, 128))
    assert capped is not None and capped.max_tokens == 16 * 128
    assert fit_cost(samples[:2], 1000) is None  # two points do not determine three terms
    noisy = [Sample(s.batch, s.length, s.ms * (1.1 if i % 2 else 0.9)) for i, s in enumerate(samples)]
    fitted = fit_cost(noisy, 1000)
    assert fitted is not None and min(fitted.fixed_ms, fitted.token_ms, fitted.token_sq_ms) >= 0  # never negative


def test_the_load_meter_sees_other_processes_and_not_its_own() -> None:
    meter = LoadMeter()
    time.sleep(0.5)
    baseline = meter.others_cores()  # whatever else the box runs now (the session's daemon, say)
    meter = LoadMeter()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:  # this process busy: not "others"
        pass
    assert meter.others_cores() < baseline + 0.5
    spin = [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"]
    spinner = subprocess.Popen(spin)
    try:
        meter = LoadMeter()
        time.sleep(1.0)
        assert meter.others_cores() >= 0.7  # one core spun by another process
    finally:
        spinner.wait(10)
    # A low-priority spinner yields its core: a calibration (nice=False) leaves its time out, the loop watch
    # counts it. Checked against the spinner's own CPU time over the same second: whatever else runs on the
    # box (in CI, the session daemon's own calibrations at full priority) counts on both sides, and may
    # leave the spinner little (nice 19 gets ~1.5 % of a busy core); the try where it ran most is judged.
    import psutil

    samples = []
    for _ in range(6):
        spinner = subprocess.Popen(["nice", "-n", "19", *spin])
        try:
            proc = psutil.Process(spinner.pid)
            time.sleep(0.1)
            before = sum(proc.cpu_times()[:2])
            meter, counted = LoadMeter(nice=False), LoadMeter()
            time.sleep(1.0)
            seen, busy = meter.others_cores(), counted.others_cores()
            samples.append((sum(proc.cpu_times()[:2]) - before, seen, busy))
        finally:
            spinner.wait(10)
        if samples[-1][0] >= 0.5:
            break
    spun, seen, busy = max(samples)
    assert busy >= 0.8 * spun and busy - seen >= 0.8 * spun - 0.05, samples


def test_a_tune_on_a_busy_box_is_not_trusted_nor_cached(store_dir: Path, tmp_path: Path) -> None:
    """Two processes spin on the box's two cores while MiniLM is calibrated: the profile says it was
    disturbed and how, nothing is cached, and the batcher would keep its defaults."""
    store = ModelStore(store_dir)
    loaded = load(store, store.manifest(DEFAULT), ProviderSelector("cpu", 2, False), discover().adapters())
    tuner = Tuner(store, probe(), TuningPolicy(latency_budget_ms=100, seq_len=32, attempts=2, pause_s=0.1))
    tuner.cache = ProfileCache(tmp_path)
    spin = "import time\nt=time.time()\nwhile time.time()-t<120: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        profile = tuner.tune(loaded)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert profile.disturbed and profile.others_cores > 0.5, profile
    assert profile.reason.startswith("not trusted: other processes kept")
    assert tuner.cached(loaded) is None and not (tmp_path / "profiles").exists()


def test_a_calibration_stops_for_the_first_request_and_is_neither_applied_nor_cached(
    store_dir: Path, tmp_path: Path
) -> None:
    """A request arriving mid-calibration has the session to itself from the next run on (the calibration
    stops at once; the pool measures again when the instance is idle), SmolLM2's and MiniLM's alike."""
    store = ModelStore(store_dir)
    tuner = Tuner(store, probe(), TuningPolicy(latency_budget_ms=400, seq_len=64))
    tuner.cache = ProfileCache(tmp_path)
    for name in (DEFAULT, SMOLLM2):
        loaded = load(store, store.manifest(name), ProviderSelector("cpu", 2, False), discover().adapters())
        asked: list[int] = []

        def interrupted(asked: list[int] = asked) -> bool:  # the instance took a request after the third run
            asked.append(1)
            return len(asked) > 3

        profile = tuner.tune(loaded, interrupted)
        assert profile.disturbed and profile.reason.startswith("not measured: requests arrived"), profile
        assert profile.trials == () and len(asked) == 4  # no run after the request came
        assert tuner.cached(loaded) is None


def test_tuning_minilm_on_this_cpu_is_cached_and_chosen_within_its_budget(store_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(store_dir)
    loaded = load(store, store.manifest(DEFAULT), ProviderSelector("cpu", 2, False), discover().adapters())
    tuner = Tuner(store, probe(), TuningPolicy(latency_budget_ms=400, seq_len=64))
    tuner.cache = ProfileCache(tmp_path)  # not the session store's own cache
    for _ in range(3):  # the session's daemon may be re-tuning in the background at this moment
        profile = tuner.tune(loaded)
        if not profile.disturbed:
            break
    assert not profile.disturbed, profile.reason
    assert len(profile.trials) >= 3 and profile.device == "cpu" and profile.seq_len == 64
    assert profile.chosen in [t.batch for t in profile.trials if t.latency_ms <= 400]
    cached = tuner.cached(loaded)
    assert cached == profile
    digest = next(f.digest for f in loaded.manifest.files if f.role == "model")
    assert (tmp_path / "profiles" / digest.replace(":", "-") / "cpu.json").is_file()
    stale = replace(profile, hardware="cpu|another box|64 cores|onnxruntime 1.0")
    tuner.cache.put(stale)
    assert tuner.cached(loaded) is None  # measured elsewhere: tune again
    # How near the best the chosen size runs is measured in bench/autotune.py ("x best calibrated"):
    # a speed, never asserted in a test.


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
        assert profile is not None
        async with s.get(daemon.url + "/api/status") as r:
            status = {m["name"]: m for m in (await r.json())["models"]}
        instance = status[DEFAULT]["instances"][0]
        assert instance["tuned"] == profile["reason"]
        if profile["disturbed"]:  # other processes were busy while it measured, or requests stopped it
            assert profile["reason"].startswith(("not trusted: ", "not measured: requests arrived"))
            assert instance["max_batch"] == 32  # the default
        else:
            # An encoder runs up to the largest size any calibrated length ran within the budget, priced
            # by the fitted cost model (short inputs batch far beyond what 128-token ones do).
            assert profile["reason"].startswith(f"batch {profile['chosen']}")
            assert profile["cost"]["token_ms"] > 0 and profile["largest"] >= profile["chosen"]
            assert instance["max_batch"] == profile["largest"]
    r = llmosd("tune", DEFAULT, "--socket", str(daemon.socket), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    again = BatchProfile.from_dict(json.loads(r.stdout))
    assert again.model == f"{DEFAULT}:1" and again.trials
    # a causal LM: rows decoded together, bounded by max_sequences (16) and the KV budget
    r = llmosd("tune", "smollm2-135m-instruct", "--socket", str(daemon.socket), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = BatchProfile.from_dict(json.loads(r.stdout))
    assert [t.batch for t in rows.trials][:3] == [1, 2, 4] and rows.memory_bound == 16 and "tokens/s" in rows.reason
    assert all(t.throughput > 0 for t in rows.trials) and rows.chosen in [t.batch for t in rows.trials]
    async with aiohttp.ClientSession() as s, s.get(daemon.url + "/api/status") as resp:
        status = {m["name"]: m for m in (await resp.json())["models"]}
    applied = status["smollm2-135m-instruct"]["instances"][0]["max_sequences"]
    # a calibration other processes disturbed is shown, not applied: the default (max_sequences) stays
    assert applied == (16 if rows.disturbed else rows.chosen), rows.reason
