"""Batch invariance and speed of each op the served graphs run, on this CPU (or an emulated one).

    python bench/invariance.py [--store DIR] [--model NAME] [--repeat 50] [--emulate EPYC-Rome]

Each op is one ONNX node at SmolLM2-135M's shapes (the fused decoder: MatMulNBits 4-bit with int8
compute, the carried block sums, the 8-bit LM head, GroupQueryAttention with rotary, the fused norms,
SiLU's sigmoid) or MiniLM's (the int8 encoder's per-token MatMulIntegerToFloat), with seeded random
weights and inputs. Sixteen rows are run alone (M = 1) and inside batches of 2, 3, 4, 5, 8 and 16 at
every position; the table gives the largest difference of a row's output against itself alone and
against itself in the batch of 16 (rows in batches of two or more), and the time per call at M = 1 and
M = 16. With --store, the whole fused graph too: a decode step's logits for 16 prompts of different
lengths, each alone and beside the others, with a lone row run at M = 1 and beside a dummy row (the
way llmosd.runtime.invariance settled on at load is marked "served"), and what a step costs each way.

--emulate CPU runs the same under qemu-user with that CPU model (apt install qemu-user): ONNX Runtime
then reads the emulated CPUID and picks that ISA's kernels, so the differences are that ISA's (times
are not, and are left out). EPYC-Rome is AVX2 without AVX-512, as Zen 2, Zen 3 and most mini-PCs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ROWS = 16
BATCHES = (2, 3, 4, 5, 8, 16)
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152  # SmolLM2-135M


@dataclass
class Op:
    name: str
    shape: str
    session: Any
    feeds: Callable[[list[int]], dict[str, np.ndarray]]  # the inputs of these rows, in this order


def session(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> Any:
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "op", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one kernel path, no split of M across threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def tensor(name: str, dtype: Any, shape: list[Any]) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, dtype, shape)


def matmul_nbits(name: str, k: int, n: int, bits: int, rng: np.random.Generator) -> Op:
    from onnx import TensorProto, helper, numpy_helper

    blocks = k // 32
    weights = rng.integers(0, 256, (n, blocks, 32 * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(scales, "S")]
    node = helper.make_node(
        "MatMulNBits",
        ["X", "W", "S"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=32,
        accuracy_level=4,
    )
    sess = session(
        [node], [tensor("X", TensorProto.FLOAT, ["M", k])], [tensor("Y", TensorProto.FLOAT, ["M", n])], inits
    )
    x = rng.standard_normal((ROWS, k), dtype=np.float32)
    return Op(name, f"{k} x {n}, {bits}-bit, blocks of 32, accuracy 4", sess, lambda rows: {"X": x[rows]})


def integer_matmul(rng: np.random.Generator) -> Op:
    """The int8 encoder's recipe: each row quantised by its own scale, then MatMulIntegerToFloat."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = 384, 1536
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array((rng.random(n, dtype=np.float32) * 0.01).astype(np.float32), "SW"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
    ]
    nodes = [
        helper.make_node("Abs", ["X"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["m"], axes=[-1], keepdims=1),
        helper.make_node("Div", ["c127", "m"], ["inv"]),
        helper.make_node("Mul", ["X", "inv"], ["xs"]),
        helper.make_node("QuantizeLinear", ["xs", "one", "zp"], ["xq"]),
        helper.make_node("MatMulIntegerToFloat", ["xq", "W", "one", "SW", "zp"], ["y"], domain="com.microsoft"),
        helper.make_node("Div", ["m", "c127"], ["back"]),
        helper.make_node("Mul", ["y", "back"], ["Y"]),
    ]
    sess = session(nodes, [tensor("X", TensorProto.FLOAT, ["M", k])], [tensor("Y", TensorProto.FLOAT, ["M", n])], inits)
    x = rng.standard_normal((ROWS, k), dtype=np.float32)
    return Op("MatMulIntegerToFloat, per-row int8", f"{k} x {n} (MiniLM's FFN)", sess, lambda rows: {"X": x[rows]})


def norm(rng: np.random.Generator) -> Op:
    from onnx import TensorProto, helper, numpy_helper

    gamma = numpy_helper.from_array(rng.random(HIDDEN, dtype=np.float32) + 0.5, "G")
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization", ["X", "R", "G"], ["Y"], domain="com.microsoft", epsilon=1e-5
    )
    shape = ["M", 1, HIDDEN]
    ins = [tensor("X", TensorProto.FLOAT, shape), tensor("R", TensorProto.FLOAT, shape)]
    sess = session([node], ins, [tensor("Y", TensorProto.FLOAT, shape)], [gamma])
    x, r = (rng.standard_normal((ROWS, 1, HIDDEN), dtype=np.float32) for _ in range(2))
    return Op("SkipSimplifiedLayerNormalization", f"{HIDDEN}", sess, lambda rows: {"X": x[rows], "R": r[rows]})


def sigmoid(rng: np.random.Generator) -> Op:
    from onnx import TensorProto, helper

    node = helper.make_node("Sigmoid", ["X"], ["Y"])
    sess = session(
        [node], [tensor("X", TensorProto.FLOAT, ["M", FFN])], [tensor("Y", TensorProto.FLOAT, ["M", FFN])], []
    )
    x = rng.standard_normal((ROWS, FFN), dtype=np.float32) * 4
    return Op("Sigmoid (SiLU's)", f"{FFN}", sess, lambda rows: {"X": x[rows]})


def attention(rng: np.random.Generator) -> Op:
    """A decode step of GroupQueryAttention as the fused graph runs it: packed QKV, rotary inside, the
    KV cache shared as past and present, each row at its own length (5 + 7 r positions)."""
    from onnx import TensorProto, helper, numpy_helper

    max_len = 128
    angles = np.arange(max_len)[:, None] / 10000 ** (np.arange(HEAD_DIM // 2)[None] / (HEAD_DIM // 2))
    inits = [
        numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "pk", "pv", "seqlens", "total", "cos", "sin"],
        ["Y", "k", "v"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        scale=HEAD_DIM**-0.5,
        do_rotary=1,
    )
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    cache = ["M", KV_HEADS, max_len, HEAD_DIM]
    ins = [
        tensor("qkv", TensorProto.FLOAT, ["M", 1, width]),
        tensor("pk", TensorProto.FLOAT, cache),
        tensor("pv", TensorProto.FLOAT, cache),
        tensor("seqlens", TensorProto.INT32, ["M"]),
        tensor("total", TensorProto.INT32, []),
    ]
    outs = [tensor("Y", TensorProto.FLOAT, ["M", 1, HEADS * HEAD_DIM]), tensor("k", TensorProto.FLOAT, cache)]
    outs.append(tensor("v", TensorProto.FLOAT, cache))
    sess = session([node], ins, outs, inits)
    qkv = rng.standard_normal((ROWS, 1, width), dtype=np.float32)
    past = rng.standard_normal((2, ROWS, KV_HEADS, max_len, HEAD_DIM), dtype=np.float32)
    lengths = np.array([5 + 7 * r for r in range(ROWS)], np.int32)

    def feeds(rows: list[int]) -> dict[str, np.ndarray]:
        return {
            "qkv": qkv[rows],
            "pk": past[0][rows].copy(),
            "pv": past[1][rows].copy(),
            "seqlens": lengths[rows],  # positions after this step, less one
            "total": np.array(lengths[rows].max() + 1, np.int32),
        }

    return Op("GroupQueryAttention, decode", f"{HEADS} heads, {KV_HEADS} KV, rotary, 5-110 positions", sess, feeds)


def ops() -> list[Op]:
    rng = np.random.default_rng(0)
    return [
        matmul_nbits("MatMulNBits, QKV", HIDDEN + 64, (HEADS + 2 * KV_HEADS) * HEAD_DIM, 4, rng),
        matmul_nbits("MatMulNBits, MLP up", HIDDEN + 64, FFN, 4, rng),
        matmul_nbits("MatMulNBits, MLP down", FFN + 128, HIDDEN, 4, rng),
        matmul_nbits("MatMulNBits, block sums", HIDDEN, 32, 4, rng),
        matmul_nbits("MatMulNBits, LM head", HIDDEN, VOCAB, 8, rng),
        attention(rng),
        norm(rng),
        sigmoid(rng),
        integer_matmul(rng),
    ]


def differences(run: Callable[[list[int]], np.ndarray], count: int = ROWS) -> tuple[float, float]:
    """Largest difference of a row against itself alone, and against itself in the batch of all."""
    alone = np.stack([run([r])[0] for r in range(count)])
    full = run(list(range(count)))
    vs_alone = vs_full = 0.0
    for m in (b for b in BATCHES if b <= count):
        for start in range(0, count, m):  # every row, at every position its batch gives it
            rows = list(range(start, min(start + m, count)))
            if len(rows) < 2:
                continue
            out = run(rows)
            vs_alone = max(vs_alone, float(np.abs(out - alone[rows]).max()))
            vs_full = max(vs_full, float(np.abs(out - full[rows]).max()))
    return vs_alone, vs_full


def timed(op: Op, rows: list[int], repeat: int) -> float:
    feeds = op.feeds(rows)
    op.session.run(None, feeds)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        op.session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def decode_step(
    store: Path, model: str, repeat: int, emulated: bool, count: int
) -> list[tuple[str, float, float, str, str]]:
    """The fused graph's first decode step for 16 prompts, alone and in batches, a lone row run at M = 1
    and beside a dummy row (which the load chose is marked); the time of a step of one row, and of 16."""
    from llmosd.runtime import ProviderSelector, load
    from llmosd.runtime.fused_lm import FusedLM
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    st = ModelStore(store)
    gen: Any = load(
        st, st.manifest(model), ProviderSelector("cpu", 1, False), discover().adapters(), max_sequences=count
    )
    gen = gen.backend
    lm = gen.lm
    assert isinstance(lm, FusedLM), "not a fused decoder graph"
    prompts = [gen.encode(" ".join(["word"] * (3 + 5 * r)), special=False) for r in range(count)]

    def run(rows: list[int], times: int = 0) -> np.ndarray:
        slots, tokens = [], []
        try:
            for r in rows:
                logits, slot = lm.prefill(prompts[r])
                slots.append(slot)
                tokens.append(int(logits.argmax()))
            out: np.ndarray = lm.decode(slots, tokens).copy()
            taken = []
            for _ in range(times):  # the same step again: each writes the same next position
                started = time.perf_counter()
                lm.decode(slots, tokens)
                taken.append(time.perf_counter() - started)
            return np.array([statistics.median(taken) * 1e6]) if times else out
        finally:
            lm.reset()

    out = []
    served = lm.min_rows
    for name, min_rows in (("a lone row alone (M = 1)", 1), ("a lone row beside a dummy row (M = 2)", 2)):
        lm.min_rows = min_rows
        name += ", served" if min_rows == served else ""
        one = sixteen = "-"
        if not emulated:
            one, sixteen = (f"{run(list(range(m)), repeat)[0]:.0f}" for m in (1, count))
        out.append((f"decode step, {name}", *differences(run, count), one, sixteen))
    lm.min_rows = served
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a store with a fused causal LM: the whole decode step too")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--decode-rows", type=int, default=ROWS, help="prompts in the decode step's batches")
    parser.add_argument("--only-decode", action="store_true", help="the decode step only (slow when emulated)")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls per op and M (medians)")
    parser.add_argument("--emulate", metavar="CPU", help="run under qemu-x86_64 -cpu CPU (differences only)")
    args = parser.parse_args()
    if args.emulate and "LLMOSD_EMULATED" not in os.environ:
        argv = ["qemu-x86_64", "-cpu", args.emulate, sys.executable, *sys.argv]
        env = dict(os.environ, LLMOSD_EMULATED=args.emulate)
        sys.exit(subprocess.run(argv, env=env, stderr=subprocess.DEVNULL, check=False).returncode)
    emulated = os.environ.get("LLMOSD_EMULATED")
    import onnxruntime as ort

    from llmosd.hardware.cpu import probe_cpu

    cpu = probe_cpu()
    where = f"qemu-user -cpu {emulated} (its CPUID; times left out)" if emulated else cpu.model
    kernels = "as the emulated CPU's CPUID says" if emulated else "/".join(cpu.kernels) or "baseline"
    print(f"# {where}; ONNX Runtime {ort.__version__}; MLAS kernels: {kernels}; one thread\n")
    print("| op | shape | row alone vs in a batch | rows in batches of 2+ | us/call M=1 | us/call M=16 (all rows) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for op in [] if args.only_decode else ops():

        def run(rows: list[int], op: Op = op) -> np.ndarray:
            out: np.ndarray = op.session.run(None, op.feeds(rows))[0]
            return out

        vs_alone, vs_full = differences(run)
        one = sixteen = "-"
        if not emulated:
            one, sixteen = (f"{timed(op, list(range(m)), args.repeat):.1f}" for m in (1, ROWS))
        print(f"| {op.name} | {op.shape} | {vs_alone:.3g} | {vs_full:.3g} | {one} | {sixteen} |", flush=True)
    if args.store:
        steps = decode_step(args.store, args.model, args.repeat, bool(emulated), args.decode_rows)
        for name, vs_alone, vs_full, one, sixteen in steps:
            print(f"| {name} | {args.model} logits | {vs_alone:.3g} | {vs_full:.3g} | {one} | {sixteen} |")


if __name__ == "__main__":
    main()
