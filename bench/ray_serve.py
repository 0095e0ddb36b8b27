"""Benchmark Ray Serve's per-request overhead against the daemon's own HTTP path, in one run.

    python bench/ray_serve.py [--rounds 3] [--requests 300]

The same MiniLM int8 store, served by a daemon (loopback TCP, plain HTTP: TLS is off on loopback) and by
``llmosd ray deploy`` on a local Ray cluster (a head with 2 CPUs, one replica of 2 CPUs: the replica runs
the same daemon behind Serve's HTTP proxy), redeployed each round with the ingress (the default) and
without (``--ingress-replicas 0``), measured once the replaced replicas are gone and after 20 requests.
Alternating rounds of: lone one-sentence requests in sequence (p50, p90; the difference is Serve's
overhead per request: its proxy, the hop to the ingress, the ingress's hop to the replica and the
replica's local hop to its daemon), and 8-sentence requests with 16 in flight (sentences/s). Peak RSS of
the daemon, of the replica, of the ingress, and of every Ray process together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


def ray_rss_mb() -> tuple[float, float, float]:
    """(a model replica's peak RSS, the ingress's, every Ray process's RSS summed), MB."""
    replica, ingress, total = 0.0, 0.0, 0.0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        line = " ".join(p.info["cmdline"] or [])
        if "ray::" in line or "raylet" in line or "gcs_server" in line or "ray/dashboard" in line:
            total += p.info["memory_info"].rss / 2**20
            if "ServeReplica" in line:
                for status in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if status.startswith("VmHWM:"):
                        peak = int(status.split()[1]) / 1024
                        if "llmosd-ingress" in line:
                            ingress = max(ingress, peak)
                        else:
                            replica = max(replica, peak)
    return replica, ingress, total


def settle(replicas: int, timeout: float = 90) -> None:
    """Wait until only the new deployment's replica processes are left (a redeploy's old ones stop
    gracefully, and would be measured otherwise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [
            p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:llmosd" in " ".join(p.info["cmdline"] or [])
        ]
        if len(running) <= replicas:
            time.sleep(2)
            return
        time.sleep(0.5)
    raise SystemExit(f"the redeployed replicas did not settle in {timeout:.0f} s")


PATHS = (
    ("daemon", "the daemon's HTTP (TCP)"),
    ("direct", "Ray Serve, --ingress-replicas 0 (proxy -> replica)"),
    ("ingress", "Ray Serve, the default (proxy -> ingress -> replica)"),
)


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
            deploy += ["--replicas", "1", "--num-cpus", "2", "--http-port", str(serve.port)]
            deploy += ["--state-dir", str(work / "state")]
            daemon.start()
            texts = corpus(args.requests * 8)
            burst = [http_request(MODEL, texts[i : i + 8]) for i in range(0, len(texts), 8)]
            lat: dict[str, list[float]] = {name: [] for name, _ in PATHS}
            rate: dict[str, list[float]] = {name: [] for name, _ in PATHS}
            peaks = [0.0, 0.0, 0.0]
            for _ in range(args.rounds):
                for name, _label in PATHS:
                    target: Daemon | Serve = daemon
                    if name != "daemon":  # the cluster's one app, redeployed each way in turn
                        ingresses = 1 if name == "ingress" else 0
                        subprocess.run(
                            [*deploy, "--ingress-replicas", str(ingresses)], check=True, capture_output=True, env=env
                        )
                        settle(1 + ingresses)
                        target = serve
                        asyncio.run(lone_latencies(target, 20, unix=False))  # type: ignore[arg-type]  # warm
                    lat[name] += asyncio.run(lone_latencies(target, args.requests, unix=False))  # type: ignore[arg-type]
                    elapsed, _ = asyncio.run(send(target, False, burst, 16))  # type: ignore[arg-type]
                    rate[name].append(len(texts) / elapsed)
                    if name != "daemon":
                        peaks = [max(a, b) for a, b in zip(peaks, ray_rss_mb(), strict=True)]
            replica, ingress_mb, total = peaks
            base = statistics.median(rate["daemon"])
            print(f"{args.rounds} rounds, alternating; lone: {args.requests} sequential one-sentence requests\n")
            print("| path | lone p50 ms | lone p90 ms | 8 x 16 in flight, sentences/s | ratio |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, label in PATHS:
                r = statistics.median(rate[name])
                print(f"| {label} | {pct(lat[name], 50):.2f} | {pct(lat[name], 90):.2f} | {r:.0f} | {r / base:.2f}x |")
            for name, label in PATHS[1:]:
                added = pct(lat[name], 50) - pct(lat["daemon"], 50)
                print(f"\n{label}: {added:.2f} ms added per request at p50", end="")
            print(
                f"\n\npeak RSS: daemon {daemon.peak_rss_mb():.0f} MB, replica {replica:.0f} MB, "
                f"ingress {ingress_mb:.0f} MB; every Ray process together at most {total:.0f} MB"
            )
        finally:
            daemon.stop()
            subprocess.run([*RAY, "stop", "--force"], capture_output=True, env=env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
