"""The fused causal-LM recipe: onnxruntime-genai's model builder writes one decoder graph
(GroupQueryAttention with rotary inside, packed QKV, SkipSimplifiedLayerNormalization, MatMulNBits),
about 150 nodes a step where optimum's export of the same Llama runs about 3,150.

The builder is an export-time tool only. onnxruntime-genai 0.12.2 is the last whose builder runs on
transformers < 4.58 (the pin optimum-onnx sets); its wheel depends on the CPU ``onnxruntime``, which must
never share an environment with ``onnxruntime-gpu``, so it is installed ``--no-deps`` and run as a child
process. Nothing of it is imported on the serving path (the daemon runs the graph with plain ORT).

Precisions: ``fp32`` (the builder's), ``int8`` (the builder's fp32 graph, every MatMul then weight-only
int8 through onnxruntime's MatMulNBitsQuantizer: builder 0.12.2 has no int8 of its own), ``int4``: where
the source's weights already lie on a 4-bit grid (a GGUF Q4 file), the builder's fp32 graph with those
weights carried exactly (exporters.grid) and the rest int8; otherwise the builder's own int4,
``k_quant_mixed`` by default (llama.cpp's mix of int8 layers, int8 LM head and embedding).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# model_type values whose builders 0.12.2 has and that this project has run through the recipe, the gate
# and the engine (tests/test_families.py, on tiny random checkpoints): what each exercises.
ARCHITECTURES = {
    "llama": "Llama 1-3.x, llama3 rope scaling",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3: QK norms",
    "phi3": "Phi-3, Phi-4-mini: partial rotary",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "granite": "Granite: embedding, attention, residual and logit multipliers",
    "nemotron": "Nemotron: partial rotary, LayerNorm1P",
    "gemma3_text": "Gemma 3 (text): five sliding-window layers to one global, QK norms, soft-capping",
    "olmo": "OLMo: LayerNorm without weights, clip_qkv (both put right in exporters.builder_fixes)",
    "smollm3": "SmolLM3: layers without rotary (NoPE, put right in exporters.builder_fixes), sliding windows",
    "gpt_oss": "gpt-oss: mixture of experts (ORT's MoE at fp32, QMoE's 8-bit or 4-bit experts), attention sinks, "
    "yarn rotary, sliding windows every other layer",
}
# Written by the builder 0.12.2 but not admitted, each for a reason measured on a tiny random checkpoint
# (auto takes optimum's recipe for them; --exporter fused says this). OLMo and SmolLM3 were here until
# exporters.builder_fixes put the builder's graphs of them right.
NOT_ADMITTED: dict[str, str] = {}
PRECISIONS = ("fp32", "int8", "int4")
# glibc serves allocations under its mmap threshold (which grows to 32 MB as big blocks are freed) from the
# heap, where a layer's freed fp32 weights stay as holes the process never gives back: the builder grew by a
# layer's bf16 size per layer (a 248M Llama: 1,638 MB peak at int8, 753 MB with this). Blocks of 256 KiB and
# more are mapped on their own and returned when freed.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 10)}
PROTOBUF_LIMIT = 2_000_000_000  # one ONNX file; beyond it weights need an external data file
EXTERNAL_DATA = "model.onnx.data"  # the store's model-data role; the graph names its weights by it
KEEP_INPUT = "logits_to_keep"  # positions whose logits a run returns, the last ones (transformers' name)

# Measured on SmolLM2-135M against PyTorch fp32 (teacher-forced, 64 positions): rtn 0.63 top-1, rtn
# with an int8 LM head 0.70, k_quant_mixed 0.75 (blocks of 16: 0.81, and slower than int8).
INT4_DEFAULTS = {
    "int4_algo_config": "k_quant_mixed",
    "int4_block_size": "32",
    "int4_is_symmetric": "false",
    "int4_accuracy_level": "4",  # int8 compute on CPU: 4x faster than dequantising to fp32
}


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def unsupported(config: dict[str, Any], precision: str) -> str | None:
    """Why the fused recipe cannot build this checkpoint at this precision; None where it can."""
    kind = config.get("model_type")
    if kind in NOT_ADMITTED:
        return f"the fused recipe does not build {kind}: {NOT_ADMITTED[kind]}"
    if kind not in ARCHITECTURES or precision not in PRECISIONS:
        return (
            f"the fused recipe builds {', '.join(sorted(ARCHITECTURES))} at {', '.join(PRECISIONS)}; "
            f"this is {kind!r} at {precision}"
        )
    # The builder 0.12.2 takes Gemma 3's layers as five sliding-window to one global, whatever the config's
    # layer_types say (its is_local: (layer + 1) % 6): another pattern would be built wrong.
    types, every = config.get("layer_types"), config.get("sliding_window_pattern", 6)
    if kind == "gemma3_text" and (types is not None or every != 6):
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types or []))]
        if every != 6 or list(types or []) != pattern:
            return "the builder lays Gemma 3's layers out five sliding-window to one global; this model's differ"
    heads = int(config.get("num_attention_heads") or 1)
    head = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
    rotary = int(head * float(config.get("partial_rotary_factor") or 1.0))
    # GroupQueryAttention takes a cos/sin cache of rotary/2 columns, a multiple of 8 (ORT 1.31); the
    # builder does not check, and the export died inside ORT (a tiny Phi-4-mini shape: 12 of 16).
    if rotary // 2 % 8:
        return f"GroupQueryAttention needs a rotary width that is a multiple of 16; this model's is {rotary}"
    return None


def build(src: Path, out: Path, precision: str, options: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """Run the builder into ``out``; return the graph (one file) and what was done."""
    carry = precision == "int4" and _carries(src, options)
    builder_precision = "fp32" if precision == "int8" or carry else precision
    extra = {"prune_lm_head": "true"}  # prefill computes the last position's logits only
    if builder_precision == "int4":
        extra |= INT4_DEFAULTS | {k: v for k, v in options.items() if k.startswith("int4_") and k != "int4_carry"}
    raw = out / "builder"
    int8_block = int(options.get("int8_block_size", "32")) if precision == "int8" else None
    steps: dict[str, Any] = {"builder": "onnxruntime-genai " + _version(), "builder_options": extra}
    steps["builder_run"] = _builder(src, raw, out / "builder-cache", builder_precision, extra, int8_block)
    if precision == "int8":
        model = _int8(raw / "model.onnx", steps, int8_block)
    elif carry:
        model = _carry(raw / "model.onnx", steps)
    else:
        model = _load(raw / "model.onnx")
    if precision == "int4" and not carry and quantize_embedding(model):  # the builder quantises only a tied one
        steps["embedding"] = "int8, symmetric blocks of 32 (GatherBlockQuantized)"
    if keep_logits(model):
        steps["logits"] = f"the last position's, or the last {KEEP_INPUT} positions' where asked (prompt scoring)"
    final = out / "model.onnx"
    # Weights in a file of their own unless asked (or past protobuf's 2 GB, always): ORT then maps them and
    # keeps less (SmolLM2 int4: resident 190 MB instead of 239, load peak 271 instead of 319).
    steps["weights"] = _save(model, final, external=options.get("external_data", "true") != "false")
    return final, steps


def _carries(src: Path, options: dict[str, str]) -> bool:
    """int4 from the source's own 4-bit blocks (exporters.grid) unless asked otherwise: ``int4_carry=false``
    or any of the builder's ``int4_*`` knobs choose the builder's re-quantisation."""
    from exporters.grid import source_on_grid

    asked = {k: v for k, v in options.items() if k.startswith("int4_")}
    if asked.pop("int4_carry", "true") == "false" or asked:
        return False
    return source_on_grid(src)


def _builder(
    src: Path, raw: Path, cache: Path, precision: str, extra: dict[str, str], int8_block: int | None
) -> dict[str, Any]:
    """The builder in a child (exporters.stream_build: a layer at a time); how it read and quantised the
    weights, and its peak resident memory."""
    report = raw / "stream.json"
    raw.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "exporters.stream_build", str(report)]
    cmd += [] if int8_block is None else ["--int8", str(int8_block)]
    cmd += ["--", "-i", str(src), "-o", str(raw), "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options"]
    cmd += [f"{k}={v}" for k, v in sorted(extra.items())]
    log = raw / "builder.log"
    with log.open("w") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=os.environ | MALLOC)
        # reaped here rather than by Popen: wait4 gives the child's own peak resident memory
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-5:])
        raise RuntimeError(f"the model builder failed: {tail}")
    done: dict[str, Any] = json.loads(report.read_text())
    done["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return done


def _carry(graph: Path, steps: dict[str, Any]) -> Any:
    """The builder's fp32 graph with its on-grid weights carried exactly and the rest (the LM head) int8."""
    from exporters import grid
    from exporters.quantize import weight_only

    model = _load(graph)
    carried = grid.carry(model)
    if carried is None:
        raise RuntimeError("the source's weights are not on a 4-bit grid after all: export with int4_carry=false")
    model, rest = weight_only(model, bits=8, block_size=32, symmetric=True)
    steps["quantize"] = {"scheme": "grid carry", **{k: v for k, v in carried.items() if v}, "rest": rest["weights"]}
    if share_embedding(model):
        steps["quantize"]["embedding"] = "int8, the LM head's blocks (tied weights kept once)"
    elif quantize_embedding(model):
        steps["quantize"]["embedding"] = "int8, symmetric blocks of 32 (GatherBlockQuantized)"
    return model


def _load(graph: Path) -> Any:
    import onnx

    return onnx.load(str(graph))  # with its external data, wherever the builder put it


def _int8(graph: Path, steps: dict[str, Any], block: int | None) -> Any:
    """The builder's graph, its MatMuls already int8 (exporters.stream_build); the embedding after them."""
    from exporters.quantize import ACCURACY_LEVEL

    model = _load(graph)
    steps["quantize"] = {
        "scheme": "weight-only",
        "weights": f"int8 symmetric, blocks of {block}",
        "ops": ["MatMul"],
        "accuracy_level": ACCURACY_LEVEL,
    }
    if share_embedding(model):
        steps["quantize"]["embedding"] = "int8, the LM head's blocks (tied weights kept once)"
    elif quantize_embedding(model):
        steps["quantize"]["embedding"] = "int8, symmetric blocks of 32 (GatherBlockQuantized)"
    return model


def quantize_embedding(model: Any, block: int = 32) -> bool:
    """An untied fp32 embedding table, gathered instead from int8 blocks of its rows (GatherBlockQuantized,
    symmetric, the implicit zero point 128 MatMulNBits' 8-bit blocks use): a 1.17B Llama's 49,152 x 2,048
    table is 403 MB in fp32, 104 MB so. False, untouched, where there is no such table."""
    from onnx import helper, numpy_helper

    g = model.graph
    tables = {t.name: t for t in g.initializer}
    gather = next(
        (n for n in g.node if n.op_type == "Gather" and n.input[0] in tables and n.input[1] == "input_ids"), None
    )
    if gather is None:
        return False
    table = numpy_helper.to_array(tables[gather.input[0]])
    if table.dtype != np.float32 or table.ndim != 2 or table.shape[1] % block:
        return False
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block)
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    quantized = (np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, width)
    name = gather.input[0]
    kept = [t for t in g.initializer if t.name != name]
    del g.initializer[:]
    g.initializer.extend(
        [
            *kept,
            numpy_helper.from_array(quantized, name + "_Q8"),
            numpy_helper.from_array(scales.astype(np.float32), name + "_scales"),
        ]
    )
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [name + "_Q8", gather.input[1], name + "_scales"],
        list(gather.output),
        name="/model/embed_tokens/GatherBlockQuantized",
        domain="com.microsoft",
        bits=8,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    at = list(g.node).index(gather)
    g.node.remove(gather)
    g.node.insert(at, lookup)
    return True


def keep_logits(model: Any) -> bool:
    """The builder's pruned LM head (``Gather(-1)`` + ``Unsqueeze``: the last position's logits only)
    becomes ``Slice(-logits_to_keep:)`` over the final norm's output, ``logits_to_keep`` a required input
    (an initializer as a default would do for ``run``, but IO binding refuses to bind one). A prompt is
    then scored in chunks, every position's logits from one run, while prefill and decode still pay for
    one position's LM head (they bind 1). False, untouched, where the graph has no such pair."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    gather = next((n for n in g.node if n.name == "/lm_head/prune/Gather"), None)
    unsqueeze = next((n for n in g.node if n.name == "/lm_head/prune/Unsqueeze"), None)
    if gather is None or unsqueeze is None or any(i.name == KEEP_INPUT for i in g.input):
        return False
    hidden = gather.input[0]
    negated, ends = f"/lm_head/keep/{KEEP_INPUT}_neg", "/lm_head/keep/ends"
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), ends),
            numpy_helper.from_array(np.array([1], np.int64), "/lm_head/keep/axes"),
        ]
    )
    g.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    neg = helper.make_node("Neg", [KEEP_INPUT], [negated], name="/lm_head/keep/Neg")
    cut = helper.make_node(
        "Slice", [hidden, negated, ends, "/lm_head/keep/axes"], list(unsqueeze.output), name="/lm_head/keep/Slice"
    )
    at = list(g.node).index(gather)
    g.node.remove(gather)
    g.node.remove(unsqueeze)
    g.node.insert(at, neg)
    g.node.insert(at + 1, cut)
    used = {i for n in g.node for i in n.input}
    dropped = {c for c in (*gather.input[1:], *unsqueeze.input[1:]) if c not in used}  # the pair's constants
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept)
    for value in [*g.output, *g.value_info]:  # the pruned length 1 becomes the asked count
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[1].dim_value == 1 and (value.name == "logits" or value.name.startswith("/lm_head")):
            dims[1].dim_param = KEEP_INPUT
    return True


def share_embedding(model: Any) -> bool:
    """Where the embedding is tied to a quantised LM head, gather it from the head's int8 blocks
    (GatherBlockQuantized) and drop the fp32 table: SmolLM2's was 113 MB, and ORT folded its Transpose
    into a second copy at load (resident 428 -> 348 MB, load peak 536 -> 373 MB; top-1 unchanged,
    perplexity ratio 1.022 -> 0.982). False, untouched, when the graph has no such pair."""
    from onnx import helper, numpy_helper

    g = model.graph
    head = next((n for n in g.node if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head.")), None)
    if head is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    weight = head.input[1].removesuffix("_Q8")
    transpose = next((n for n in g.node if n.op_type == "Transpose" and n.input[0] == weight), None)
    gather = next(
        (n for n in g.node if transpose and n.op_type == "Gather" and n.input[0] == transpose.output[0]), None
    )
    if attrs.get("bits") != 8 or len(head.input) != 3 or transpose is None or gather is None:
        return False  # asymmetric blocks (zero points) or an untied head: leave it
    shape = numpy_helper.from_array(np.array([attrs["N"], attrs["K"]], np.int64), "/model/embed_tokens/blocks_shape")
    g.initializer.append(shape)
    blocks = "/model/embed_tokens/blocks"
    reshape = helper.make_node("Reshape", [head.input[1], shape.name], [blocks], name="/model/embed_tokens/Reshape")
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [blocks, gather.input[1], head.input[2]],
        list(gather.output),
        name="/model/embed_tokens/GatherBlockQuantized",
        domain="com.microsoft",
        bits=8,
        block_size=attrs["block_size"],
        gather_axis=0,
        quantize_axis=1,
    )
    at = list(g.node).index(transpose)
    g.node.remove(transpose)
    g.node.remove(gather)
    g.node.insert(at, reshape)
    g.node.insert(at + 1, lookup)
    kept = [t for t in g.initializer if t.name != weight]
    del g.initializer[:]
    g.initializer.extend(kept)
    return True


def _save(model: Any, final: Path, external: bool) -> str:
    """Write the graph as the store keeps it; say where its weights went."""
    import onnx

    size = sum(t.ByteSize() for t in model.graph.initializer)
    if external or size >= PROTOBUF_LIMIT:
        onnx.save(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)
        return f"external data ({EXTERNAL_DATA}, {size / 1e9:.2f} GB)"
    onnx.save(model, str(final))
    return "inside the graph file"


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("onnxruntime-genai")
