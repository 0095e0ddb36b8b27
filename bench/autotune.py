"""Benchmark batch autotuning: for each encoder model, throughput at the autotuned batch size against
batch 1 and a fixed batch of 32 (Infinity's default), side by side in one run.

    python bench/autotune.py [--state-dir bench/.state/int8 ...] [--sentences 512] [--runs 3]

The corpus (tests/data/sentences.txt, cycled) is tokenised once and run through the model's own
backend (the daemon's pre/post-processing) in arrival order at each batch size; runs alternate between
the sizes so the VM's drift hits them alike; medians of --runs. The tuner measures fresh (its cache is
not used) with the default budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import CORPUS, ensure_model  # the embeddings bench's corpus and stores

ROOT = Path(__file__).resolve().parent.parent
FIXED = 32  # Infinity's default batch size


def throughput(backend: Any, encodings: list[Any], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(encodings), batch):
        backend.run(encodings[i : i + batch])
    return len(encodings) / (time.perf_counter() - t0)


def bench_store(state: Path, name: str, n: int, runs: int) -> list[str]:
    import onnxruntime as ort

    from llmosd.hardware import probe
    from llmosd.hardware.autotune import ProfileCache
    from llmosd.runtime import ProviderSelector, load
    from llmosd.scheduler.tuning import Tuner, TuningPolicy
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    store, hw = ModelStore(state), probe()
    loaded = load(store, store.manifest(name), ProviderSelector("auto", cuda=hw.cuda), discover().adapters())
    tuner = Tuner(store, hw, TuningPolicy())
    with tempfile.TemporaryDirectory() as tmp:
        tuner.cache = ProfileCache(Path(tmp))  # measure fresh
        t0 = time.perf_counter()
        profile = tuner.tune(loaded)
        tune_s = time.perf_counter() - t0
    backend = loaded.backend
    encodings = backend.prepare([CORPUS[i % len(CORPUS)] for i in range(n)])
    within = [t.batch for t in profile.trials if t.latency_ms <= profile.latency_budget_ms]
    sizes = sorted({1, profile.chosen, FIXED, *within})
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(runs):
        for b in sizes:
            rates[b].append(throughput(backend, encodings, b))
    med = {b: statistics.median(r) for b, r in rates.items()}
    m = loaded.manifest
    out = [
        f"#### {m.name}:{m.version} ({m.precision}) on {loaded.placement.device}, onnxruntime {ort.__version__}",
        "",
        f"tuning took {tune_s:.1f} s: {profile.reason}",
        "",
        "| batch size | sentences/s | x batch 1 | x batch 32 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for b in sizes:
        label = f"{b} (autotuned)" if b == profile.chosen else str(b)
        out.append(f"| {label} | {med[b]:.0f} | {med[b] / med[1]:.2f} | {med[b] / med[FIXED]:.2f} |")
    best = max(within, key=lambda b: med[b]) if within else profile.chosen
    return [
        *out,
        "",
        f"autotuned / best calibrated size within the budget (batch {best}): **{med[profile.chosen] / med[best]:.2f}**",
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["int8", "fp32"], choices=["int8", "fp32"])
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    args = p.parse_args()
    import psutil

    out = [
        f"### bench/autotune.py — {time.strftime('%Y-%m-%d')}, {psutil.cpu_count(logical=False)} cores "
        f"({os.uname().machine}), {args.sentences} sentences in arrival order, medians of {args.runs}",
        "",
    ]
    for precision in args.precision:
        state = args.state_dir / precision
        name = f"bench-minilm-{precision}"  # the embeddings bench's store
        ensure_model(state, name, precision)
        out += bench_store(state, name, args.sentences, args.runs)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
