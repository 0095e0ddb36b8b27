"""Benchmark hybrid routing: what a LAN hop costs, and what a second box behind routing gives, in one run.

    sudo python bench/routing.py [--rounds 3] [--requests 200]

Two network namespaces joined by a veth pair (as the tests build them; needs root), a daemon in each,
both serving MiniLM int8 with one site token, TLS on (the LAN port's default), mDNS finding each other:

- **hop**: a lone one-sentence /v1/embeddings request, sent alternately to box-a over its Unix socket
  (direct) and to box-b over its Unix socket with box-b's policy ``remote`` (box-b forwards it to box-a
  over TLS on the veth). The p50 difference is the routing overhead per request: box-b's routing and
  proxy, a TLS hop, and box-a's TCP path instead of its socket.
- **scale**: --requests requests of 8 sentences, 16 in flight, to box-a alone (policy local, both boxes
  up) and to box-b with ``prefer-local`` and a queue of 16, whose overflow box-a takes. Sentences/s and
  p50/p99, rounds alternating. Both boxes share this machine's two cores, so little gain is expected.

Peak RSS (VmHWM) of each daemon. The client is a minimal HTTP/1.1 client on asyncio streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import CORPUS, Daemon, connect, corpus, ensure_model, http_request, pct, roundtrip, send

MODEL = "all-minilm-l6-v2"
TOKEN = "bench-site-token-0123456789abcdef"
A_ADDR, B_ADDR = "10.209.77.1", "10.209.77.2"
QUEUE = {"LLMOSD_MAX_QUEUE": "16"}  # box-b's: beyond two requests of 8 waiting, the rest overflow


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    tag = os.getpid() % 100000
    a, b = f"llmosd-ba{tag}", f"llmosd-bb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"bva{tag}", "type", "veth", "peer", "name", f"bvb{tag}")
        for ns, dev, addr in ((a, f"bva{tag}", A_ADDR), (b, f"bvb{tag}", B_ADDR)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def box(state: Path, work: Path, ns: str, name: str, *flags: str, env: dict[str, str] | None = None) -> Daemon:
    """A daemon in namespace ``ns``, on the LAN (0.0.0.0), routing to the LAN's boxes by ``flags``."""
    work.mkdir(parents=True, exist_ok=True)
    d = Daemon(state, work, {"LLMOSD_AUTOTUNE": "false", "LLMOSD_MDNS_NAME": name, **(env or {})})
    d.cmd = ["ip", "netns", "exec", ns, *d.cmd, "--host", "0.0.0.0", "--lan-upstreams", "true", *flags]
    return d


def store_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("tls", "id", "token", "*.sock"))
    (dst / "token").write_text(TOKEN + "\n")
    (dst / "token").chmod(0o600)
    return dst


def wait_peer(d: Daemon, route: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ups = d.get_json("/api/status")["routing"]["upstreams"]
        if any(u["route"] == route and u["up"] for u in ups):
            return
        time.sleep(0.25)
    raise RuntimeError(f"{route} never came up")


async def lone_latencies(d: Any, n: int, unix: bool = True) -> list[float]:
    """``n`` one-sentence requests in sequence on one connection; each one's latency."""
    reader, writer = await connect(d, unix=unix)
    out = []
    for i in range(n):
        request = http_request(MODEL, [CORPUS[i % 24]])
        t0 = time.perf_counter()
        await roundtrip(reader, writer, request)
        out.append(time.perf_counter() - t0)
    writer.close()
    return out


def hop(a: Daemon, b: Daemon, rounds: int, n: int) -> list[str]:
    direct: list[float] = []
    routed: list[float] = []
    for _ in range(rounds):
        direct += asyncio.run(lone_latencies(a, n))
        routed += asyncio.run(lone_latencies(b, n))
    p50 = pct(routed, 50) - pct(direct, 50)
    return [
        "| one sentence, sequential | p50 ms | p90 ms |",
        "| --- | ---: | ---: |",
        f"| box-a direct (its Unix socket) | {pct(direct, 50):.2f} | {pct(direct, 90):.2f} |",
        f"| via box-b, route remote (LAN hop, TLS) | {pct(routed, 50):.2f} | {pct(routed, 90):.2f} |",
        f"| **added by the hop** | **{p50:.2f}** | {pct(routed, 90) - pct(direct, 90):.2f} |",
    ]


def scale(a: Daemon, b: Daemon, rounds: int, n: int, how: str) -> tuple[float, list[str]]:
    """Alternating rounds of box-a alone and box-b overflowing to box-a; (box-a's rate, table rows)."""
    texts = corpus(n * 8)
    requests = [http_request(MODEL, texts[i : i + 8]) for i in range(0, len(texts), 8)]
    rows = {f"one box, {how}": a, f"two boxes, {how} (box-b, overflow to box-a)": b}
    figures: dict[str, list[tuple[float, list[float]]]] = {label: [] for label in rows}
    for _ in range(rounds):
        for label, d in rows.items():
            elapsed, lat = asyncio.run(send(d, True, requests, 16))
            figures[label].append((len(texts) / elapsed, lat))
    one = statistics.median(r for r, _ in figures[f"one box, {how}"])
    lines = []
    for label, runs in figures.items():
        rate = statistics.median(r for r, _ in runs)
        lat = [x for _, lats in runs for x in lats]
        lines.append(f"| {label} | {rate:.0f} | {rate / one:.2f}x | {pct(lat, 50):.1f} | {pct(lat, 99):.1f} |")
    return one, lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("network namespaces need root")
    with tempfile.TemporaryDirectory(prefix="llmosd-bench-routing-") as tmp:
        work = Path(tmp)
        ensure_model(work / "src", MODEL, "int8")
        with two_namespaces() as (ns_a, ns_b):
            a_state = store_copy(work / "src", work / "a-state")
            a = box(a_state, work / "a", ns_a, "box-a")
            b_state = store_copy(work / "src", work / "b-state")
            b = box(b_state, work / "b", ns_b, "box-b", "--route", "remote")
            a.start()
            b.start()
            try:
                wait_peer(b, "lan:box-a")
                print(f"hop: {args.rounds} rounds of {args.requests} requests each way, alternating\n")
                print("\n".join(hop(a, b, args.rounds, args.requests)))
                b.stop()
                table = [
                    "| 8 sentences a request, 16 in flight | sentences/s | ratio to one box | p50 ms | p99 ms |",
                    "| --- | ---: | ---: | ---: | ---: |",
                ]
                # each box at its defaults (ORT threads on both cores, spinning), then each on one core's
                # worth (one thread, no spinning): two boxes on one machine share its two cores
                for how, flags in (("defaults", ()), ("1 thread each", ("--threads", "1", "--ort-spinning", "false"))):
                    if flags:
                        a.stop()
                        a = box(a_state, work / "a", ns_a, "box-a", *flags)
                        a.start()
                    b = box(b_state, work / "b", ns_b, "box-b", "--route", "prefer-local", *flags, env=QUEUE)
                    b.start()
                    wait_peer(b, "lan:box-a")
                    _, rows = scale(a, b, args.rounds, args.requests, how)
                    table += rows
                    sent = sum(u["sent"] for u in b.get_json("/api/status")["routing"]["upstreams"])
                    table.append(
                        f"| (box-b forwarded {sent} of its {args.rounds * (args.requests + 4)} requests) | | | | |"
                    )
                    if flags:
                        break
                    b.stop()
                print(f"\nscale: {args.rounds} rounds of {args.requests} requests, alternating\n")
                print("\n".join(table))
                print(f"peak RSS: box-a {a.peak_rss_mb():.0f} MB, box-b {b.peak_rss_mb():.0f} MB")
            finally:
                b.stop()
                a.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
