"""Benchmark Ray Serve's per-request overhead against the daemon's own HTTP path, in one run.

    python bench/ray_serve.py [--rounds 3] [--requests 300]

The same MiniLM int8 store, served by a daemon (loopback TCP, plain HTTP: TLS is off on loopback) and by
``llmosd ray deploy`` on a local Ray cluster (a head with 2 CPUs, one replica of 2 CPUs: the replica runs
the same daemon behind Serve's HTTP proxy). Alternating rounds of: lone one-sentence requests in
sequence (p50, p90; the difference is Serve's overhead per request: its proxy, the hop to the replica
and the replica's local hop to its daemon), and 8-sentence requests with 16 in flight (sentences/s).
Peak RSS of the daemon, of the replica, and of every Ray process together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import Daemon, corpus, ensure_model, free_port, http_request, pct, send
from routing import lone_latencies

MODEL = "all-minilm-l6-v2"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class Serve:
    port: int
    sock: Path = Path("/nonexistent")  # the bench client's shape: TCP only


def ray_rss_mb() -> tuple[float, float]:
    """(the replica's peak RSS, every Ray process's RSS summed), MB."""
    replica, total = 0.0, 0.0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        line = " ".join(p.info["cmdline"] or [])
        if "ray::" in line or "raylet" in line or "gcs_server" in line or "ray/dashboard" in line:
            total += p.info["memory_info"].rss / 2**20
            if "ServeReplica" in line:
                for status in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if status.startswith("VmHWM:"):
                        replica = max(replica, int(status.split()[1]) / 1024)
    return replica, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory(prefix="llmosd-bench-ray-") as tmp:
        work = Path(tmp)
        ensure_model(work / "state", MODEL, "int8")
        daemon = Daemon(work / "state", work, {"LLMOSD_AUTOTUNE": "false"})
        head = free_port()
        start = [*RAY, "start", "--head", "--port", str(head), "--num-cpus", "2", "--include-dashboard", "false"]
        subprocess.run([*start, "--disable-usage-stats"], check=True, capture_output=True, env=env)
        try:
            serve = Serve(free_port())
            deploy = [sys.executable, "-m", "llmosd", "ray", "deploy", MODEL, "--address", f"127.0.0.1:{head}"]
            deploy += [
                "--replicas",
                "1",
                "--num-cpus",
                "2",
                "--http-port",
                str(serve.port),
                "--state-dir",
                str(work / "state"),
            ]
            subprocess.run(deploy, check=True, capture_output=True, env=env)
            daemon.start()
            texts = corpus(args.requests * 8)
            burst = [http_request(MODEL, texts[i : i + 8]) for i in range(0, len(texts), 8)]
            lat: dict[str, list[float]] = {"daemon": [], "serve": []}
            rate: dict[str, list[float]] = {"daemon": [], "serve": []}
            for _ in range(args.rounds):
                for name, target in (("daemon", daemon), ("serve", serve)):
                    lat[name] += asyncio.run(lone_latencies(target, args.requests, unix=False))
                    elapsed, _ = asyncio.run(send(target, False, burst, 16))  # type: ignore[arg-type]
                    rate[name].append(len(texts) / elapsed)
            d, s = (statistics.median(rate[k]) for k in ("daemon", "serve"))
            print(f"{args.rounds} rounds, alternating; lone: {args.requests} sequential one-sentence requests\n")
            print("| path | lone p50 ms | lone p90 ms | 8 x 16 in flight, sentences/s | ratio |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, label, r in (
                ("daemon", "the daemon's HTTP (TCP)", d),
                ("serve", "Ray Serve (proxy -> replica)", s),
            ):
                print(f"| {label} | {pct(lat[name], 50):.2f} | {pct(lat[name], 90):.2f} | {r:.0f} | {r / d:.2f}x |")
            added = pct(lat["serve"], 50) - pct(lat["daemon"], 50)
            print(f"\nRay Serve adds {added:.2f} ms per request at p50")
            replica, total = ray_rss_mb()
            print(
                f"peak RSS: daemon {daemon.peak_rss_mb():.0f} MB, replica {replica:.0f} MB; "
                f"every Ray process now {total:.0f} MB"
            )
        finally:
            daemon.stop()
            subprocess.run([*RAY, "stop", "--force"], capture_output=True, env=env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
