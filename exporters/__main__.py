"""Child-process entry: ``python -m exporters --src DIR --task T --precision P --out DIR``.

Writes the artifact files into ``--out`` and ``result.json`` beside them (the manifest draft).
Exit status: 0 done, 2 bad request, 3 validation refused the artifact, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an appliance exports from local folders only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmosd.tasks import PRECISIONS, Export, Source, Task, Tolerance, discover


def _tensor_specs(model: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The graph's inputs and outputs, and the bytes a CPU session of it keeps resident once loaded
    (the placement ledger charges that; weights alone undercount what ORT holds: packed copies)."""
    import gc

    import onnxruntime as ort
    import psutil

    from llmosd.runtime.memory import trim_heap

    gc.collect()
    trim_heap()  # freed heap back first: a session built in reused pages would measure as nothing
    process = psutil.Process()
    before = process.memory_info().rss
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    # never below the file: what ORT keeps is at least the weights
    on_disk = sum(p.stat().st_size for p in (model, model.with_name(model.name + ".data")) if p.is_file())
    resident = max(process.memory_info().rss - before, on_disk)

    def spec(x: Any) -> dict[str, Any]:
        return {"name": x.name, "dtype": x.type, "shape": [d if d is not None else "?" for d in x.shape]}

    return [spec(i) for i in s.get_inputs()], [spec(o) for o in s.get_outputs()], resident


def _tokenizer_json(src: Path, dst: Path) -> None:
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)  # type: ignore[no-untyped-call]
    tok.backend_tokenizer.save(str(dst))


def run(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    from exporters import memory, source
    from exporters.validate import validate

    recipe = task.export
    if recipe is None:
        raise ValueError(f"the {task.name} task has no export recipe: its models come from a registry")
    if args.precision not in recipe.tolerances:
        raise ValueError(f"{args.task} has no {args.precision} recipe; choose from {', '.join(recipe.tolerances)}")
    out: Path = args.out
    src: Path = source.from_gguf(args.src, out / "hf") if args.src.suffix == ".gguf" else args.src
    config = source.model_config(src)
    use_fused = _fused(args, recipe, config)
    runtime: dict[str, Any] = {}
    fits = memory.check(src, args.precision, use_fused) if recipe.fused else None
    steps = _export_graph(args, recipe, src, out, config, runtime, use_fused)
    if fits is not None:
        steps["memory"] = fits
    files = _files(recipe, src, out)
    # The fused graph is built for the CPU provider (GroupQueryAttention, MatMulNBits at accuracy level 4);
    # its CUDA build is another graph (fp16), not proven here yet. Per-token int8 runs on MLAS's u8s8
    # kernels: CUDA has no MatMulIntegerToFloat, and fp16 is that device's precision.
    cpu_only = use_fused or (args.precision == "int8" and recipe.int8_scheme == "per-token")
    devices = ("cpu",) if cpu_only else ("cuda",) if args.precision == "fp16" else ("cpu", "cuda")
    inputs, outputs, resident = _tensor_specs(out / "model.onnx")
    facts = Source(src, config, outputs, _options(args.option), _options(args.sampling), out / "tokenizer.json")
    runtime = {"max_seq_length": source.max_seq_length(src, config)} | recipe.settings(facts) | runtime
    t1 = time.monotonic()
    tolerance = _tolerance(recipe.tolerances[args.precision], args.tolerance)
    validation = validate(src, out / "model.onnx", out / "tokenizer.json", task, runtime, devices, tolerance)
    steps["validate_s"] = round(time.monotonic() - t1, 2)
    if src != args.src:
        shutil.rmtree(src)  # the dequantised folder made from the GGUF file
    return {
        "task": args.task,
        "precision": args.precision,
        "devices": list(devices),
        "inputs": inputs,
        "outputs": outputs,
        "runtime": runtime,
        "recipe": {
            "opset": recipe.opset,
            "exporter": "onnxruntime-genai model builder" if use_fused else "optimum-onnx",
            "steps": steps,
            "resident_bytes": resident,
        },
        "validation": validation,
        "source": source.source_info(args.src, config, args.source_id),
        "files": files,
    }


def _export_graph(
    args: argparse.Namespace,
    recipe: Export,
    src: Path,
    out: Path,
    config: dict[str, Any],
    runtime: dict[str, Any],
    use_fused: bool,
) -> dict[str, Any]:
    """out/model.onnx (and its weights) by the fused builder or optimum; the steps' timings."""
    t0 = time.monotonic()
    if use_fused:
        from exporters import fused

        _, steps = fused.build(src, out, args.precision, _options(args.option))
        steps["export_s"] = round(time.monotonic() - t0, 2)
        runtime["kv_cache"] = "in-place"  # GroupQueryAttention writes past and present in one buffer
        return steps
    return _optimum(args, recipe, src, out, config)


def _files(recipe: Export, src: Path, out: Path) -> dict[str, str]:
    """The artifact's files beside the graph, by role; the builders' work folders go."""
    _tokenizer_json(src, out / "tokenizer.json")
    shutil.copyfile(src / "config.json", out / "config.json")
    files = {"model.onnx": "model", "tokenizer.json": "tokenizer", "config.json": "config"}
    if (out / "model.onnx.data").is_file():  # the fused recipe's weights
        files["model.onnx.data"] = "model-data"
    for title, role in recipe.extra_files.items():  # a causal LM's generation_config.json
        if (src / title).is_file():
            shutil.copyfile(src / title, out / title)
            files[title] = role
    for work in ("raw", "builder", "builder-cache"):
        shutil.rmtree(out / work, ignore_errors=True)
    return files


def _optimum(args: argparse.Namespace, recipe: Export, src: Path, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """optimum's export, ORT's offline fusions where the architecture has them, then quantisation."""
    from exporters.onnx_export import export_onnx, optimize
    from exporters.quantize import quantize_int8, quantize_weight_only

    t0 = time.monotonic()
    raw = export_onnx(src, out / "raw", recipe.optimum_task, recipe.opset)
    steps: dict[str, Any] = {"export_s": round(time.monotonic() - t0, 2)}
    quantized = args.precision in ("int8", "int4")
    optimized = out / ("optimized.onnx" if quantized else "model.onnx")
    steps["optimize"] = optimize(raw, optimized, config, args.precision == "fp16")
    if args.precision == "int4":
        steps["quantize"] = quantize_weight_only(optimized, out / "model.onnx", bits=4, symmetric=False)
    elif args.precision == "int8" and recipe.int8_scheme == "weight-only":
        steps["quantize"] = quantize_weight_only(optimized, out / "model.onnx", bits=8)
    elif args.precision == "int8":
        steps["quantize"] = quantize_int8(optimized, out / "model.onnx", recipe.int8_ops)
    if quantized:
        optimized.unlink()
    return steps


def _fused(args: argparse.Namespace, recipe: Export, config: dict[str, Any]) -> bool:
    """Whether the fused recipe builds this causal LM (``--exporter auto``: wherever it can)."""
    from exporters import fused

    if not recipe.fused or args.exporter == "optimum":
        return False
    why = fused.unsupported(config, args.precision)
    if why is None and not fused.available():
        why = (
            "the fused recipe needs onnxruntime-genai's model builder: pip install --no-deps onnxruntime-genai==0.12.2"
        )
    if why is not None and args.exporter == "fused":
        raise ValueError(why)
    return why is None


def _options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"a recipe option is KEY=VALUE, not {item!r}")
        options[key] = value
    return options


def _tolerance(base: Tolerance, overrides: list[str]) -> Tolerance:
    """Apply ``KEY=VALUE`` overrides (a stricter check than the recipe's, for instance)."""
    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in vars(base):
            raise ValueError(f"unknown tolerance {key!r}; choose from {', '.join(vars(base))}")
        values[key] = float(value)
    return replace(base, **values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters", description=__doc__)
    p.add_argument("--src", type=Path, required=True)
    tasks = discover()
    p.add_argument("--task", choices=tasks.exportable(), required=True)
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source-id", default=None)
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--exporter", choices=("auto", "fused", "optimum"), default="auto")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a recipe option")
    p.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE", help="a default sampling parameter")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="exporter: %(message)s")
    from exporters.validate import ValidationFailed

    try:
        gguf = args.src.is_file() and args.src.suffix == ".gguf"
        if not gguf and not (args.src / "config.json").is_file():
            raise ValueError(f"{args.src} is not a Hugging Face model folder (no config.json) nor a .gguf file")
        args.out.mkdir(parents=True, exist_ok=True)
        result = run(args, tasks[args.task])
    except ValidationFailed as exc:
        print(f"error: validation refused the {args.precision} artifact: {exc}", file=sys.stderr)
        return 3
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
