"""Benchmark model instances on the CPU: one instance with every thread against N instances splitting
them, each behind its own batcher, requests routed to the least-loaded one, side by side in one run.

    python bench/instances.py [--precision int8 fp32] [--instances 2] [--requests 512] [--concurrency 32]

Single-sentence requests from the embeddings bench's corpus go through the real pool (tokenise, batch,
session.run, pool) with ``concurrency`` in flight; runs alternate between the layouts so the VM's drift
hits them alike; medians of --runs. Peak RSS is not compared here: every layout holds its own sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import CORPUS, ensure_model  # the embeddings bench's corpus and stores

from llmosd.scheduler import ModelPool

ROOT = Path(__file__).resolve().parent.parent


async def rate(pool: ModelPool, name: str, n: int, concurrency: int) -> float:
    served = await pool.acquire(name)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await served.infer([CORPUS[i % len(CORPUS)]])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    pool.release(served)
    return n / (time.perf_counter() - t0)


async def bench(state: Path, name: str, layouts: list[int], args: argparse.Namespace) -> list[str]:
    from llmosd.hardware import probe
    from llmosd.runtime import Loader, ProviderSelector
    from llmosd.scheduler import BatchPolicy
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    store, hw = ModelStore(state), probe()
    pools = {}
    for k in layouts:
        pool = ModelPool(store, hw, Loader(ProviderSelector("cpu"), discover().adapters()), BatchPolicy(), instances=k)
        await pool.load(name)
        pools[k] = pool
    rates: dict[int, list[float]] = {k: [] for k in layouts}
    for k in layouts:  # warm every layout once
        await rate(pools[k], name, args.requests // 4, args.concurrency)
    for _ in range(args.runs):
        for k in layouts:
            rates[k].append(await rate(pools[k], name, args.requests, args.concurrency))
    med = {k: statistics.median(r) for k, r in rates.items()}
    threads = {k: [i.loaded.placement.threads for i in pools[k].get(name).instances] for k in layouts}
    for pool in pools.values():
        await pool.close()
    out = [
        f"#### {name}, {args.requests} single-sentence requests, {args.concurrency} in flight",
        "",
        "| instances | threads each | requests/s | x 1 instance |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for k in layouts:
        out.append(f"| {k} | {threads[k][0] or '-'} | {med[k]:.0f} | {med[k] / med[layouts[0]]:.2f} |")
    return [*out, ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["int8"], choices=["int8", "fp32"])
    p.add_argument("--instances", type=int, nargs="+", default=[2])
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    args = p.parse_args()
    import psutil

    out = [
        f"### bench/instances.py — {time.strftime('%Y-%m-%d')}, {psutil.cpu_count(logical=False)} cores "
        f"({os.uname().machine}), medians of {args.runs}",
        "",
    ]
    for precision in args.precision:
        state = args.state_dir / precision
        name = f"bench-minilm-{precision}"
        ensure_model(state, name, precision)
        out += asyncio.run(bench(state, name, [1, *args.instances], args))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
