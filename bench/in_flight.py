"""What a server can reach when it sees only the requests in flight: the bound behind issue 15's
"concurrency 32 x 1 sentence: >= 0.85 x the length-sorted raw ceiling" target.

    python bench/in_flight.py [--precision fp32] [--sentences 2048] [--runs 2] [--window 32]

The length-sorted ceiling sorts the whole corpus before it batches, but with one sentence a request
and 32 in flight no scheduler holds more than 32 sentences at a time. So the raw session (no HTTP, no
event loop, no client) is also run on consecutive windows of --window sentences in arrival order. Each
window is sorted and split by the daemon's own planner (``llmosd.scheduler.planning.partition``) under
the cost model the daemon measured (its autotune profile), and the daemon then runs at that
concurrency. Raw and daemon runs alternate. Medians of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import ROOT, Daemon, corpus, ensure_model, load, raw_session, raw_throughput

from llmosd.hardware.autotune import CostModel
from llmosd.scheduler.planning import partition


def cost_model(daemon: Daemon) -> CostModel:
    """The cost model of the daemon's first model, from /api/hardware."""
    profile = daemon.get_json("/api/hardware")["placements"][0]["batch_profile"]
    if not profile or not profile.get("cost"):
        raise SystemExit("the daemon's profile has no cost model (autotune off or not trusted)")
    return CostModel(**profile["cost"])


def windowed(model: Any, texts: list[str], window: int, cost: CostModel, max_batch: int) -> float:
    """Sentences/s of the raw session when only ``window`` sentences are known at a time."""
    encs = model.prepare(texts)
    batches = []
    for i in range(0, len(encs), window):
        pool = sorted(encs[i : i + window], key=len)
        starts = partition([len(e) for e in pool], max_batch, cost.max_tokens, cost.run_ms)
        batches += [pool[a:b] for a, b in zip(starts, [*starts[1:], len(pool)], strict=True)]
    t0 = time.perf_counter()
    for batch in batches:
        model.run(batch)
    return len(texts) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32", choices=["int8", "fp32"])
    p.add_argument("--sentences", type=int, default=2048)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    args = p.parse_args()
    name = f"bench-minilm-{args.precision}"
    state = args.state_dir / args.precision
    ensure_model(state, name, args.precision)
    texts = corpus(args.sentences)
    raw = raw_session(state, name)
    raw.warmup()
    with tempfile.TemporaryDirectory() as work:
        daemon = Daemon(state, Path(work), {"LLMOSD_MDNS": "false"})
        daemon.start()
        try:
            daemon.wait_tuned()
            cost = cost_model(daemon)
            rows: dict[str, list[float]] = {"ceiling": [], "window": [], "daemon": []}
            for _ in range(args.runs):
                rows["ceiling"].append(max(raw_throughput(raw, texts, b, True) for b in (16, 32, 64)))
                rows["window"].append(windowed(raw, texts, args.window, cost, 64))
                rows["daemon"].append(asyncio.run(load(daemon, False, name, texts, 1, args.window))[0])
        finally:
            daemon.stop()
    ceiling, window, served = (statistics.median(rows[k]) for k in ("ceiling", "window", "daemon"))
    print(
        f"#### bench/in_flight.py — {time.strftime('%Y-%m-%d')}, MiniLM-L6 {args.precision}, "
        f"{args.sentences} sentences, medians of {args.runs}"
    )
    print()
    print(
        f"cost model: {cost.fixed_ms:.2f} ms + per padded token {cost.token_ms * 1000:.1f} us "
        f"(+ {cost.token_sq_ms * 1e6:.3f} ns x length), runs up to {cost.max_tokens} tokens"
    )
    print()
    print("| path | sentences/s | x sorted ceiling |")
    print("| --- | ---: | ---: |")
    print(f"| raw session, whole corpus sorted by length (the ceiling) | {ceiling:.0f} | 1.00 |")
    print(
        f"| raw session, {args.window} sentences known at a time, the daemon's split | {window:.0f} | "
        f"{window / ceiling:.2f} |"
    )
    print(
        f"| daemon over TCP, 1 sentence a request, {args.window} in flight | {served:.0f} | "
        f"{served / ceiling:.2f} ({served / window:.2f} of the windowed bound) |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
