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

from exporters.recipes import PRECISIONS, RECIPES, Recipe, Tolerance


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from exporters import source
    from exporters.validate import validate

    recipe = RECIPES[args.task]
    if args.precision not in recipe.tolerances:
        raise ValueError(f"{args.task} has no {args.precision} recipe; choose from {', '.join(recipe.tolerances)}")
    out: Path = args.out
    src: Path = source.from_gguf(args.src, out / "hf") if args.src.suffix == ".gguf" else args.src
    config = source.model_config(src)
    runtime = _runtime_settings(args, src, config)
    use_fused = _fused(args, config)
    steps = _export_graph(args, recipe, src, out, config, runtime, use_fused)
    files = _files(args, src, out)
    # The fused graph is built for the CPU provider (GroupQueryAttention, MatMulNBits at accuracy level 4);
    # its CUDA build is another graph (fp16), not proven here yet. Per-token int8 runs on MLAS's u8s8
    # kernels: CUDA has no MatMulIntegerToFloat, and fp16 is that device's precision.
    cpu_only = use_fused or (args.precision == "int8" and recipe.int8_scheme == "per-token")
    devices = ("cpu",) if cpu_only else ("cuda",) if args.precision == "fp16" else ("cpu", "cuda")
    inputs, outputs, resident = _tensor_specs(out / "model.onnx")
    if args.task == "feature-extraction":
        runtime["dimensions"] = outputs[0]["shape"][-1]
        runtime |= _matryoshka(_options(args.option), runtime["dimensions"])
    t1 = time.monotonic()
    tolerance = _tolerance(recipe.tolerances[args.precision], args.tolerance)
    validation = validate(src, out / "model.onnx", out / "tokenizer.json", args.task, runtime, devices, tolerance)
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


def _runtime_settings(args: argparse.Namespace, src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What the server needs to run the task, read from the source (the manifest's ``runtime``)."""
    from exporters import source

    runtime: dict[str, Any] = {"max_seq_length": source.max_seq_length(src, config)}
    if args.task == "feature-extraction":
        runtime |= source.embedding_settings(src)
    elif args.task == "text-generation":
        runtime |= source.generation_settings(src, config)
        runtime["sampling"] = _sampling(runtime["sampling"], args.sampling)
    elif args.task == "text-ranking":
        runtime |= source.ranking_settings(config)
    else:
        runtime |= source.classification_settings(config)
    return runtime


def _export_graph(
    args: argparse.Namespace,
    recipe: Recipe,
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


def _files(args: argparse.Namespace, src: Path, out: Path) -> dict[str, str]:
    """The artifact's files beside the graph, by role; the builders' work folders go."""
    _tokenizer_json(src, out / "tokenizer.json")
    shutil.copyfile(src / "config.json", out / "config.json")
    files = {"model.onnx": "model", "tokenizer.json": "tokenizer", "config.json": "config"}
    if (out / "model.onnx.data").is_file():  # the fused recipe's weights
        files["model.onnx.data"] = "model-data"
    if args.task == "text-generation" and (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
        files["generation_config.json"] = "generation-config"
    for work in ("raw", "builder", "builder-cache"):
        shutil.rmtree(out / work, ignore_errors=True)
    return files


def _optimum(args: argparse.Namespace, recipe: Recipe, src: Path, out: Path, config: dict[str, Any]) -> dict[str, Any]:
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


def _fused(args: argparse.Namespace, config: dict[str, Any]) -> bool:
    """Whether the fused recipe builds this causal LM (``--exporter auto``: wherever it can)."""
    from exporters import fused

    if args.task != "text-generation" or args.exporter == "optimum":
        return False
    why = None
    if not fused.supports(config, args.precision):
        why = (
            f"the fused recipe builds {', '.join(sorted(fused.ARCHITECTURES))} at {', '.join(fused.PRECISIONS)}; "
            f"this is {config.get('model_type')!r} at {args.precision}"
        )
    elif not fused.available():
        why = (
            "the fused recipe needs onnxruntime-genai's model builder: pip install --no-deps onnxruntime-genai==0.12.2"
        )
    if why is not None and args.exporter == "fused":
        raise ValueError(why)
    return why is None


def _sampling(found: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """generation_config.json's sampling, then ``--sampling KEY=VALUE`` (the recipe's or a person's)."""
    from llmosd.runtime.sampling import check_defaults, parse_number

    values: dict[str, object] = dict(found)
    values |= {key: parse_number(key, text) for key, text in _options(items).items()}
    return check_defaults(values)


def _matryoshka(options: dict[str, str], dimensions: Any) -> dict[str, Any]:
    """``--option matryoshka=256,128,64``: the operator says the model was trained so that its leading
    dimensions are an embedding of their own (Matryoshka representation learning); nothing in a
    checkpoint says so. Requests may then ask ``dimensions`` at most the full width."""
    text = options.get("matryoshka")
    if text is None:
        return {}
    try:
        sizes = sorted({int(x) for x in text.split(",")}, reverse=True)
    except ValueError:
        raise ValueError(f"matryoshka={text}: a comma-separated list of dimensions") from None
    if not isinstance(dimensions, int) or not sizes or not all(0 < d <= dimensions for d in sizes):
        raise ValueError(f"matryoshka={text}: each dimension must be in [1, {dimensions}]")
    return {"matryoshka_dimensions": sizes}


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
    p.add_argument("--task", choices=sorted(RECIPES), required=True)
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
        result = run(args)
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
