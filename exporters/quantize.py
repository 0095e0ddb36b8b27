"""Dynamic int8 quantisation with onnxruntime.quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quantize_int8(model: Path, out: Path, op_types: tuple[str, ...]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(model),
        str(out),
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(op_types),
        # Fused contrib ops (Attention, SkipLayerNormalization) defeat shape inference; their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"scheme": "dynamic", "weights": "int8 per-channel symmetric", "ops": list(op_types)}


def quantize_weight_only(
    model: Path, out: Path, bits: int = 8, block_size: int = 32, symmetric: bool = True
) -> dict[str, Any]:
    """Weight-only blockwise quantisation of every MatMul (ORT's MatMulNBits); activations stay float."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), block_size=block_size, is_symmetric=symmetric, bits=bits)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    kind = "symmetric" if symmetric else "asymmetric"
    return {"scheme": "weight-only", "weights": f"int{bits} {kind}, blocks of {block_size}", "ops": ["MatMul"]}
