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

from exporters.recipes import PRECISIONS, RECIPES, Tolerance


def _tensor_specs(model: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])

    def spec(x: Any) -> dict[str, Any]:
        return {"name": x.name, "dtype": x.type, "shape": [d if d is not None else "?" for d in x.shape]}

    return [spec(i) for i in s.get_inputs()], [spec(o) for o in s.get_outputs()]


def _tokenizer_json(src: Path, dst: Path) -> None:
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)  # type: ignore[no-untyped-call]
    tok.backend_tokenizer.save(str(dst))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from exporters import source
    from exporters.onnx_export import export_onnx, optimize
    from exporters.quantize import quantize_int8, quantize_weight_only
    from exporters.validate import validate

    recipe = RECIPES[args.task]
    if args.precision not in recipe.tolerances:
        raise ValueError(f"{args.task} has no {args.precision} recipe; choose from {', '.join(recipe.tolerances)}")
    out: Path = args.out
    src: Path = source.from_gguf(args.src, out / "hf") if args.src.suffix == ".gguf" else args.src
    config = source.model_config(src)
    runtime: dict[str, Any] = {"max_seq_length": source.max_seq_length(src, config)}
    if args.task == "feature-extraction":
        runtime |= source.embedding_settings(src)
    elif args.task == "text-generation":
        runtime |= source.generation_settings(src, config)
    else:
        runtime |= source.classification_settings(config)
    t0 = time.monotonic()
    raw = export_onnx(src, out / "raw", recipe.optimum_task, recipe.opset)
    steps: dict[str, Any] = {"export_s": round(time.monotonic() - t0, 2)}
    fp16 = args.precision == "fp16"
    quantized = args.precision in ("int8", "int4")
    optimized = out / ("optimized.onnx" if quantized else "model.onnx")
    steps["optimize"] = optimize(raw, optimized, config, fp16)
    if args.precision == "int4":
        steps["quantize"] = quantize_weight_only(optimized, out / "model.onnx", bits=4, symmetric=False)
    elif args.precision == "int8" and recipe.int8_scheme == "weight-only":
        steps["quantize"] = quantize_weight_only(optimized, out / "model.onnx", bits=8)
    elif args.precision == "int8":
        steps["quantize"] = quantize_int8(optimized, out / "model.onnx", recipe.int8_ops)
    if quantized:
        optimized.unlink()
    _tokenizer_json(src, out / "tokenizer.json")
    shutil.copyfile(src / "config.json", out / "config.json")
    files = {"model.onnx": "model", "tokenizer.json": "tokenizer", "config.json": "config"}
    if args.task == "text-generation" and (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
        files["generation_config.json"] = "generation-config"
    shutil.rmtree(out / "raw")
    devices = ("cuda",) if fp16 else ("cpu", "cuda")
    inputs, outputs = _tensor_specs(out / "model.onnx")
    if args.task == "feature-extraction":
        runtime["dimensions"] = outputs[0]["shape"][-1]
    t1 = time.monotonic()
    validation = validate(
        src,
        out / "model.onnx",
        out / "tokenizer.json",
        args.task,
        runtime,
        devices,
        _tolerance(recipe.tolerances[args.precision], args.tolerance),
    )
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
        "recipe": {"opset": recipe.opset, "exporter": "optimum-onnx", "steps": steps},
        "validation": validation,
        "source": source.source_info(args.src, config, args.source_id),
        "files": files,
    }


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
