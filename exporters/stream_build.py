"""onnxruntime-genai's model builder (0.12.2), run so that no step holds the model whole in fp32.

As shipped, the builder loads the checkpoint with ``from_pretrained`` and no dtype (fp32: 32 GB for an 8B),
builds the whole fp32 graph, and only then quantises it, copying it once more into a protobuf (``to_int4``).
This runs the same builder with three of its methods replaced:

- ``load_weights`` builds the model on the meta device, and its walk over the modules reads a decoder layer's
  weights from the safetensors shards when the builder reaches it and drops them after (exporters.weights);
- each MatMul's weights are quantised when the builder makes the node: a one-node graph through the very
  quantiser and settings ``to_int4`` would have used (ORT's MatMulNBitsQuantizer), so the result is the same
  and what stays in memory is the quantised layers;
- ``to_int4`` has nothing left to do and returns the graph as it is (it falls back to the original where a
  MatMul was left unquantised, a recipe this does not handle).

With ``--int8 BLOCK`` the builder runs at fp32 and each MatMul is quantised to symmetric int8 blocks instead
(what exporters.quantize's whole-graph pass did after the builder). Checkpoints this cannot stream (GGUF,
AWQ/GPTQ, .bin weights, names the model does not use) go through the builder's own loader, said in the report.

Usage: ``python -m exporters.stream_build REPORT.json [--int8 BLOCK] -- BUILDER ARGS...``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPORT: dict[str, Any] = {"weights": "the builder's loader (the checkpoint whole, fp32)", "quantised": "none"}


def _wanted(module: Any, vocab: int) -> Any:
    """The modules the builder reads as a whole (the embedding, a decoder layer, the final norm, the head),
    and the dtype to read each in: the vocabulary's tables as stored (the graph casts them when it is
    written; an 8B's embedding is 1 GB in bf16, 2 in fp32), the rest in fp32 as ``from_pretrained`` gave
    them to the builder."""
    import torch

    if isinstance(module, torch.nn.Embedding) or (isinstance(module, torch.nn.Linear) and module.out_features == vocab):
        return "stored"
    kind = type(module).__name__
    return (
        isinstance(module, torch.nn.Linear)
        or kind.endswith(("DecoderLayer", "GLMBlock"))
        or next(module.parameters(recurse=False), None) is not None
    )


CHUNK = 4 << 20  # weights quantised this many at a time (ORT's quantiser holds several copies of its input)


def _one_graph(name: str, weight_name: str, weight: Any, x: str, y: str, settings: dict[str, Any]) -> Any:
    """One MatMul (``x @ weight -> y``, weight K x N fp32) through ORT's MatMulNBitsQuantizer, as a graph."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, weight_name], [y], name=name)],
        "one",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "sequence", k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", "sequence", n])],
        [numpy_helper.from_array(weight, weight_name)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, **settings)
    quantizer.process()
    return quantizer.model.model.graph


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="quantize")


def quantize(
    name: str, weight_name: str, weight: Any, x: str, y: str, settings: dict[str, Any], chunk: int = CHUNK
) -> tuple[list[Any], dict[str, Any]]:
    """A MatMul whose torch weight is ``weight`` (N x K, as a Linear holds it) quantised as ORT's quantiser
    does in a whole graph: its nodes and initializers (numpy), named as it names them there.

    The output rows (N) are quantised ``chunk`` weights at a time and the blocks put together: each row's
    blocks, scales and zero points depend on that row only (MatMulNBits lays them out row by row), and
    the quantiser's copies of an 8B's LM head (525M weights) would otherwise take several GB."""
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    n, k = weight.shape
    excluded = name in settings.get("nodes_to_exclude", ())
    step = n if excluded else max(1, chunk // k)

    def one(at: int) -> tuple[list[Any], dict[str, Any]]:
        part = weight[at : at + step].detach().to(torch.float32).T.contiguous().numpy()
        graph = _one_graph(name, weight_name, part, x, y, settings)
        used = {i for node in graph.node for i in node.input}  # a quantiser may leave the float weight behind
        return list(graph.node), {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in used}

    nodes: list[Any] = []
    tensors: dict[str, list[Any]] = {}
    # the pieces on every core: ORT's k_quant is numpy (one core, ~1.3M weights a second here) and releases
    # the GIL in its array work; the results come back in order, so the blocks are the same
    for piece_nodes, arrays in _pool().map(one, range(0, n, step)):
        nodes = nodes or piece_nodes
        for title, array in arrays.items():
            tensors.setdefault(title, []).append(array)
    if n > step:
        (node,) = nodes
        assert node.op_type == "MatMulNBits", node.op_type
        for attr in node.attribute:
            if attr.name == "N":
                attr.CopyFrom(helper.make_attribute("N", n))
    return nodes, {
        title: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for title, arrays in tensors.items()
    }


def _add(builder: Any, nodes: list[Any], tensors: dict[str, Any], out_dtype: Any, out_shape: list[Any]) -> None:
    """Put a quantised MatMul's nodes and initializers into the builder's graph."""
    from onnx import helper

    for title, array in tensors.items():
        builder.make_initializer(array, title)
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        builder.make_node(
            node.op_type, list(node.input), list(node.output), name=node.name, domain=node.domain, **attrs
        )
        for out in node.output:
            builder.make_value(out, out_dtype, shape=out_shape)


def patch(model_class: Any, int8_block: int | None, chunk: int = CHUNK) -> None:
    import torch

    from exporters import weights
    from exporters.quantize import ACCURACY_LEVEL

    load_weights, to_int4, init = model_class.load_weights, model_class.to_int4, model_class.__init__
    make_node = model_class.make_node
    matmul_int4 = model_class.make_matmul_int4

    def streamed_load(self: Any, input_path: str) -> Any:
        src = Path(self.model_name_or_path)
        overrides = {"num_hidden_layers": self.num_layers} if "num_hidden_layers" in self.extra_options else {}
        own_loader = input_path.endswith(".gguf") or self.quant_type is not None or "adapter_path" in self.extra_options
        ready = None if own_loader or not src.is_dir() else weights.streaming(src, torch.float32, **overrides)
        if ready is None:
            return load_weights(self, input_path)
        model, filler = ready
        model.modules = lambda: weights.walk_filling(model, filler, lambda m: _wanted(m, self.vocab_size))
        REPORT["weights"] = "read a layer at a time from the safetensors shards"
        return model

    def per_node(self: Any) -> bool:
        attrs = self.quant_attrs["int4"]
        return not self.quant_attrs["use_qdq"] and tuple(attrs["op_types_to_quantize"]) == ("MatMul",)

    def quantized(
        self: Any, matmul: Any, basename: str, root_input: str, settings: dict[str, Any], **kwargs: Any
    ) -> str:
        weight_name = basename[1:].replace("/", ".") + ".weight"
        output = "logits" if kwargs.get("logits", False) else f"{basename}/output_0"
        nodes, tensors = quantize(basename, weight_name, matmul.weight, root_input, output, settings, chunk)
        seq_dim = kwargs.get("seq_dim", "sequence_length")
        _add(self, nodes, tensors, self.io_dtype, ["batch_size", seq_dim, matmul.weight.shape[0]])
        return basename

    def int4_now(self: Any, matmul: Any, basename: str, root_input: str, **kwargs: Any) -> str:
        if hasattr(matmul, "qweight") or not per_node(self):
            return str(matmul_int4(self, matmul, basename, root_input, **kwargs))
        a = self.quant_attrs["int4"]
        settings = {
            "block_size": a["qdq_block_size"],
            "is_symmetric": a["is_symmetric"],
            "accuracy_level": a["accuracy_level"],
            "nodes_to_exclude": a["nodes_to_exclude"],
            "op_types_to_quantize": a["op_types_to_quantize"],
            "algo_config": a["algo_config"],
        }
        REPORT["quantised"] = "int4, a MatMul at a time as the builder makes it"
        return quantized(self, matmul, basename, root_input, settings, **kwargs)

    def int8_now(self: Any, matmul: Any, basename: str, root_input: str, **kwargs: Any) -> str:
        settings = {"block_size": int8_block, "is_symmetric": True, "bits": 8, "accuracy_level": ACCURACY_LEVEL}
        name = quantized(self, matmul, basename, root_input, settings, **kwargs)
        if self.shared_embeddings and basename == "/lm_head/MatMul":
            # the tied embedding reads the head's float weight (Transpose -> Gather) until exporters.fused
            # gathers it from the head's int8 blocks instead
            self.make_initializer(matmul.weight.T, "lm_head.MatMul.weight", to=self.io_dtype)
        REPORT["quantised"] = f"int8 symmetric blocks of {int8_block}, a MatMul at a time as the builder makes it"
        return name

    def nothing_left(self: Any) -> Any:
        weights = [n.inputs[1] for n in self.model.graph if n.op_type == "MatMul" and len(n.inputs) > 1]
        left = [w for w in weights if w is not None and w.const_value is not None]
        if not left:
            return self.model
        REPORT["quantised"] = f"the whole graph at the end ({len(left)} MatMuls were left for it)"
        return to_int4(self)

    def adjusted(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self.quant_type == "mxfp4":
            # gpt-oss as OpenAI ships it: the builder's QuantModel has no MXFP4 (it raises); the experts are
            # read dequantised instead (exporters.weights, as transformers dequantises them on a CPU)
            self.quant_type = None
        # At int8 the builder runs at fp32 and would write a mixture of experts' weights (most of the model)
        # as fp32 MoE; they become QMoE's symmetric 8-bit blocks instead, the builder's own quantiser.
        if int8_block is not None and self.moe_attrs["num_experts"]:
            self.moe_attrs.update(op_type="QMoE", expert_weight_bits=8, block_size=int8_block)
            self.qmoe_block_size = self.quant_attrs["int4"]["qmoe_block_size"] = int8_block

    def with_accuracy(self: Any, op_type: str, *args: Any, **kwargs: Any) -> Any:
        # QMoE with int8 activations, as the MatMulNBits beside it: at gpt-oss-20b's shape 1.7 ms a token
        # and layer where the builder's default (none: fp32 activations) took 4.2 (bench/moe.py, AVX-512)
        if op_type == "QMoE":
            kwargs.setdefault("accuracy_level", ACCURACY_LEVEL)
        return make_node(self, op_type, *args, **kwargs)

    model_class.__init__ = adjusted
    model_class.make_node = with_accuracy
    model_class.load_weights = streamed_load
    model_class.to_int4 = nothing_left
    model_class.make_matmul_int4 = int4_now
    if int8_block is not None:
        model_class.make_matmul_float = int8_now


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.stream_build")
    p.add_argument("report", type=Path)
    p.add_argument("--int8", type=int, default=None, metavar="BLOCK")
    p.add_argument("--chunk", type=int, default=CHUNK, help="weights quantised at a time")
    at = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:at])
    import onnxruntime_genai.models  # noqa: F401  (puts its folder on sys.path: the builder imports "builders")
    from builders.base import Model

    from exporters import builder_fixes

    builder_fixes.apply()
    patch(Model, args.int8, args.chunk)
    sys.argv = ["builder", *argv[at + 1 :]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    args.report.write_text(json.dumps(REPORT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
