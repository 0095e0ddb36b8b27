"""HF folder -> ONNX with optimum, then ORT's transformer graph fusions where the architecture has them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Architectures whose attention/LayerNorm/GELU patterns ORT's "bert" fusions recognise.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


def export_onnx(src: Path, out: Path, optimum_task: str, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    # library_name="transformers": the bare encoder; pooling happens in llmosd's numpy code.
    main_export(
        str(src),
        output=str(out),
        task=optimum_task,
        opset=opset,
        library_name="transformers",
        do_validation=False,  # our own validation below compares the whole served pipeline
        local_files_only=True,
    )
    return out / "model.onnx"


def optimize(model: Path, out: Path, config: dict[str, Any], fp16: bool) -> dict[str, Any]:
    """Fuse attention, LayerNorm and GELU (and convert to fp16 if asked); return what was done."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = config.get("model_type")
    if model_type not in _BERT_LIKE:
        done = {"fusions": "none (architecture not fusible offline; ORT fuses at load)"}
        if fp16:
            return done | to_float16(model, out)
        shutil.copyfile(model, out)
        return done
    opt = optimize_model(
        str(model),
        model_type="bert",
        num_heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
        use_gpu=fp16,
    )
    if fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(out))
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return {"fusions": stats}


def to_float16(model: Path, out: Path) -> dict[str, Any]:
    """The whole graph in fp16, inputs and outputs included: a causal LM's KV cache then takes half the
    memory and moves no casts per step. Integer inputs (ids, mask, positions) stay integers."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(model)), keep_io_types=False, disable_shape_infer=True)
    onnx.save(converted, str(out))
    return {"float16": "weights, activations, past/present key-values and logits"}
