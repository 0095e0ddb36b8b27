"""A mixture-of-experts layer on this CPU: ONNX Runtime's MoE and QMoE kernels at gpt-oss's shapes.

    python bench/moe.py [--shape 20b|tiny] [--repeat 20] [--threads 2]

One expert layer of gpt-oss-20b's shape (hidden 2880, expert width 2880, 32 experts, 4 per token, SwiGLU
with gpt-oss's alpha 1.702 and limit 7), random weights, each way exporters/fused.py can write it:

- ``MoE fp32``: the builder's fp32 graph (ORT's CPU MoE);
- ``QMoE 8-bit``: what the int8 recipe writes (symmetric blocks of 32; ORT runs 8-bit experts with int8
  activations, ``ORT_QMOE_CPU_QNBIT_GEMM`` unset);
- ``QMoE 8-bit, fp32 activations``: the same weights with ``ORT_QMOE_CPU_QNBIT_GEMM=fp32`` (ORT's dequantising
  path);
- ``QMoE 4-bit``: what the int4 recipe writes (symmetric blocks of 32, the node's default accuracy level);
- ``QMoE 4-bit, accuracy_level 4``: int8 activations;
- ``MatMulNBits 4-bit (dense, 4 experts)``: the weights one token reads (4 experts' fc1 and fc2) as two dense
  MatMulNBits at accuracy level 4: what the same bytes cost through the kernel the dense layers use.

Each is written to disk by one process and run by another, whose peak RSS is the weights as ORT keeps
them. Tokens per call M = 1 (a decode step) and M = 16, medians of --repeat calls; "GB/s" is the bytes of
the experts one token reads (4 of 32) at M = 1 over the time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = {"20b": (2880, 2880, 32, 4), "tiny": (256, 256, 8, 2)}  # hidden, expert width, experts, per token
BLOCK = 32
ALPHA, LIMIT = 1.702, 7.0
VARIANTS = {
    "moe-fp32": "MoE fp32",
    "qmoe-8": "QMoE 8-bit",
    "qmoe-8-fp32": "QMoE 8-bit, fp32 activations",
    "qmoe-4": "QMoE 4-bit",
    "qmoe-4-acc4": "QMoE 4-bit, accuracy_level 4",
    "dense-4": "MatMulNBits 4-bit (dense, 4 experts)",
}


def _graph(variant: str, hidden: int, width: int, experts: int, k: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {}
    common: dict[str, Any] = {"k": k, "activation_type": "swiglu", "activation_alpha": ALPHA, "activation_beta": 1.0}
    common |= {"swiglu_fusion": 1, "swiglu_limit": LIMIT, "normalize_routing_weights": 1}
    bias1, bias2 = np.zeros((experts, 2 * width), np.float32), np.zeros((experts, hidden), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])
    router = helper.make_tensor_value_info("r", TensorProto.FLOAT, ["T", experts])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])
    inputs = [x, router]
    if variant == "moe-fp32":
        inits = {"w1": rng.standard_normal((experts, 2 * width, hidden), np.float32) * 0.02, "b1": bias1}
        inits |= {"w2": rng.standard_normal((experts, hidden, width), np.float32) * 0.02, "b2": bias2}
        node = helper.make_node("MoE", ["x", "r", "w1", "b1", "w2", "b2"], ["y"], domain="com.microsoft", **common)
    elif variant.startswith("qmoe"):
        bits = int(variant.split("-")[1])
        per_byte = 8 // bits

        def packed(rows: int, cols: int) -> np.ndarray:
            return rng.integers(0, 256, (experts, rows, cols // per_byte), dtype=np.uint8)

        def scales(rows: int, cols: int) -> np.ndarray:
            return np.full((experts, rows, cols // BLOCK), 0.02 / 7, np.float16)

        inits = {"w1": packed(2 * width, hidden), "s1": scales(2 * width, hidden), "b1": bias1}
        inits |= {"w2": packed(hidden, width), "s2": scales(hidden, width), "b2": bias2}
        extra: dict[str, Any] = {"accuracy_level": 4} if variant.endswith("acc4") else {}
        names = ["x", "r", "w1", "s1", "b1", "w2", "s2", "b2"]
        node = helper.make_node(
            "QMoE", names, ["y"], domain="com.microsoft", expert_weight_bits=bits, block_size=BLOCK, **common, **extra
        )
    else:  # the bytes one token reads, as two dense MatMulNBits
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        n1, n2 = k * 2 * width, hidden  # fc1 of k experts side by side, then fc2 over their k outputs
        w1 = rng.standard_normal((hidden, n1), np.float32) * 0.02
        w2 = rng.standard_normal((k * width, n2), np.float32) * 0.02
        mid = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["T", k * width])
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Slice", ["h", "start", "end", "axis"], ["m"]),  # stands in for SwiGLU's halving
            helper.make_node("MatMul", ["m", "w2"], ["y"]),
        ]
        consts = {"start": np.array([0]), "end": np.array([k * width]), "axis": np.array([1]), "w1": w1, "w2": w2}
        graph = helper.make_graph(nodes, "dense", [x], [y], [numpy_helper.from_array(v, n) for n, v in consts.items()])
        graph.value_info.append(mid)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        q = MatMulNBitsQuantizer(model, block_size=BLOCK, is_symmetric=True, accuracy_level=4)
        q.process()
        return q.model.model
    graph = helper.make_graph([node], "moe", inputs, [y], [numpy_helper.from_array(v, n) for n, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def build_variant(variant: str, shape: str, out: Path) -> None:
    import onnx

    model = _graph(variant, *SHAPES[shape])
    onnx.save_model(model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data")


def run_variant(variant: str, shape: str, repeat: int, threads: int, folder: Path) -> dict[str, Any]:
    import onnxruntime as ort

    hidden, _, experts, _ = SHAPES[shape]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    times = {}
    for m in (1, 16):
        feeds = {"x": rng.standard_normal((m, hidden)).astype(np.float32)}
        if variant != "dense-4":
            feeds["r"] = rng.standard_normal((m, experts)).astype(np.float32)
        session.run(None, feeds)  # first call packs what it packs
        laps = []
        for _ in range(repeat):
            t = time.perf_counter()
            session.run(None, feeds)
            laps.append(time.perf_counter() - t)
        times[m] = statistics.median(laps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"m1_ms": times[1] * 1e3, "m16_ms": times[16] * 1e3, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="20b")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the children's
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant and args.build:
        build_variant(args.variant, args.shape, args.build)
        return
    if args.variant and args.run:
        print(json.dumps(run_variant(args.variant, args.shape, args.repeat, args.threads, args.run)))
        return
    import onnxruntime as ort

    from llmosd.hardware.cpu import probe_cpu

    cpu = probe_cpu()
    hidden, width, experts, k = SHAPES[args.shape]
    params = k * 3 * hidden * width  # fc1 (two halves) and fc2 of the k experts one token reads
    print(f"# {cpu.model}; MLAS kernels: {'/'.join(cpu.kernels) or 'baseline'}; ONNX Runtime {ort.__version__}")
    print(f"# one layer, hidden {hidden}, experts {experts} of width {width}, {k} per token; {args.threads} threads\n")
    print("| kernel | ms/call M=1 | ms/call M=16 | GB/s at M=1 | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, label in VARIANTS.items():
        env = dict(os.environ)
        env.pop("ORT_QMOE_CPU_QNBIT_GEMM", None)
        if variant == "qmoe-8-fp32":
            env["ORT_QMOE_CPU_QNBIT_GEMM"] = "fp32"
        argv = [sys.executable, __file__, "--variant", variant, "--shape", args.shape]
        with tempfile.TemporaryDirectory() as folder:
            r = subprocess.run([*argv, "--build", folder], capture_output=True, text=True, check=False)
            if not r.returncode:
                argv += ["--repeat", str(args.repeat), "--threads", str(args.threads), "--run", folder]
                r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if r.returncode:
            print(f"| {label} | failed: {r.stderr.strip().splitlines()[-1][:120]} | | | |")
            continue
        f = json.loads(r.stdout.splitlines()[-1])
        bits = {"moe-fp32": 32, "qmoe-8": 8, "qmoe-8-fp32": 8}.get(variant, 4)
        gbs = params * bits / 8 / (f["m1_ms"] / 1e3) / 1e9
        print(f"| {label} | {f['m1_ms']:.2f} | {f['m16_ms']:.2f} | {gbs:.1f} | {f['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
