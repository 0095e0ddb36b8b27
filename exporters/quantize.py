"""Int8 and int4 quantisation: per-token int8 for encoders, weight-only blocks (MatMulNBits) for decoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Per-token activations: each row's scale is its own absolute maximum, so a row quantises the same
# whatever it is batched with (ORT's quantize_dynamic takes one scale over the whole batch: MiniLM's
# vectors then move by up to 0.035 with their neighbours). Measured by bench/int8.py.
_EPS = 1e-8  # an all-zero row (padding) must not divide by zero


def quantize_int8(model: Path, out: Path, op_types: tuple[str, ...]) -> dict[str, Any]:
    """Int8 weights (per output channel, symmetric) and int8 activations scaled per row, for every
    MatMul with a constant 2-D weight (``op_types`` names what the recipe allows; MatMul only today)."""
    import onnx

    if tuple(op_types) != ("MatMul",):
        raise ValueError(f"per-token int8 rewrites MatMul only, not {op_types}")
    proto = onnx.load(str(model))
    count = per_token_int8(proto)
    onnx.save(proto, str(out))
    return {
        "scheme": "per-token dynamic",
        "weights": "int8 per-channel symmetric",
        "activations": "int8 per row (token), symmetric, scale = row max / 127",
        "ops": list(op_types),
        "matmuls": count,
    }


def per_token_int8(model: Any) -> int:
    """Rewrite ``model`` in place: MatMul(X, W) becomes
    MatMulIntegerToFloat(Q(X * 127 / m), Wq, 1, sw, 128) * m / 127, with m = max|X| over X's last axis,
    Wq = round(W / sw) and sw = max|W| per column / 127. Q is QuantizeLinear at scale 1, zero point 128:
    uint8 with a constant zero point is MLAS's u8s8 path (VNNI's vpdpbusd) while the row's scale stays
    a float applied after. Integer accumulation is exact, so no row can see another. Returns the count."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    axes_as_input = _opset(model, "") >= 18  # ReduceMax's axes became an input in opset 18
    nodes: list[Any] = []
    count = 0
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        replacement, tensors = _per_token_matmul(node, numpy_helper.to_array(w), f"pt{count}_", axes_as_input)
        nodes += replacement
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in tensors.items())
        count += 1
    if count == 0:
        return 0
    shared: dict[str, Any] = {
        "pt_eps": np.array(_EPS, np.float32),
        "pt_127": np.array(127, np.float32),
        "pt_inv127": np.array(1 / 127, np.float32),
        "pt_one": np.array(1, np.float32),
        "pt_zp": np.array(128, np.uint8),
        "pt_axes": np.array([-1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if _opset(model, "com.microsoft") == 0:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)
    return count


def _per_token_matmul(node: Any, weight: Any, p: str, axes_as_input: bool) -> tuple[list[Any], dict[str, Any]]:
    """The nodes that replace one MatMul, and the tensors they add (per_token_int8's docstring)."""
    import numpy as np
    from onnx import helper

    values = weight.astype(np.float32)
    scale = np.maximum(np.abs(values).max(axis=0), 1e-12) / 127
    quantized = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
    x = node.input[0]
    reduce = (
        helper.make_node("ReduceMax", [p + "abs", "pt_axes"], [p + "max"], keepdims=1)
        if axes_as_input
        else helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1)
    )
    nodes = [
        helper.make_node("Abs", [x], [p + "abs"]),
        reduce,
        helper.make_node("Max", [p + "max", "pt_eps"], [p + "m"]),
        helper.make_node("Div", ["pt_127", p + "m"], [p + "inv"]),
        helper.make_node("Mul", [x, p + "inv"], [p + "xn"]),
        helper.make_node("QuantizeLinear", [p + "xn", "pt_one", "pt_zp"], [p + "xq"]),
        helper.make_node(
            "MatMulIntegerToFloat", [p + "xq", p + "w", "pt_one", p + "sw", "pt_zp"], [p + "y"], domain="com.microsoft"
        ),
        helper.make_node("Mul", [p + "m", "pt_inv127"], [p + "s"]),
        helper.make_node("Mul", [p + "y", p + "s"], [node.output[0]], name=node.name),
    ]
    return nodes, {p + "w": quantized, p + "sw": scale.astype(np.float32)}


def _opset(model: Any, domain: str) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain == domain), 0)


# MatMulNBits compute: 0 dequantises to fp32 per call; 4 quantises activations to int8 per block and runs
# integer kernels. Measured on SmolLM2 int8, one decode step on 2 cores: 62 ms at level 0, 16 ms at level 4.
ACCURACY_LEVEL = 4


def quantize_weight_only(
    model: Path, out: Path, bits: int = 8, block_size: int = 32, symmetric: bool = True, external: bool = False
) -> dict[str, Any]:
    """Blockwise quantisation of every MatMul's weights (ORT's MatMulNBits), int8 compute on CPU."""
    import onnx

    quantized, done = weight_only(onnx.load(str(model)), bits, block_size, symmetric)
    onnx.save(
        quantized, str(out), save_as_external_data=external, all_tensors_to_one_file=True, location=out.name + ".data"
    )
    return done


def weight_only(model: Any, bits: int = 8, block_size: int = 32, symmetric: bool = True) -> tuple[Any, dict[str, Any]]:
    """``quantize_weight_only`` on a ModelProto in memory (MatMuls with constant weights only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, block_size=block_size, is_symmetric=symmetric, bits=bits, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    quantizer.model.topological_sort()
    kind = "symmetric" if symmetric else "asymmetric"
    done = {
        "scheme": "weight-only",
        "weights": f"int{bits} {kind}, blocks of {block_size}",
        "ops": ["MatMul"],
        "accuracy_level": ACCURACY_LEVEL,
    }
    return quantizer.model.model, done
