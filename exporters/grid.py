"""int4 without a second rounding: weights that already lie on a 4-bit grid per block of 32 (what a
GGUF's Q4_0, Q4_1 or Q4_K blocks dequantise to) are written into MatMulNBits exactly.

A block of 32 weights on such a grid is ``w = d * q + m`` with ``q`` in 0..15. MatMulNBits stores
``d * (q - 8)`` exactly (symmetric, no zero points: its fast int8-compute path); the rest,
``c = m + 8 d`` per block, is a per-block offset whose product with the activations is
``sum_b c[b] * blocksum_b(x)``. Float zero points would carry ``m`` directly, but ORT 1.31 runs them
about 50x slower on CPU (534 against 10 us for a 1536 x 576 matmul), and a separate offset path (a
Reshape, ReduceSum, MatMul and Add per weight) costs more node dispatch than 4-bit saves (SmolLM2: a
decode step 5.8 ms against int8's 5.6). So the offsets ride in
the same MatMulNBits: its input grows by the activations' block sums (one small 4-bit matmul against a
0/1 matrix), twice, and its weights by two 4-bit digit blocks of ``c`` (``c ~ s1 * q1 + s2 * q2``,
~8 bits): 5.0 ms a step. A re-quantisation of such weights to a second 4-bit grid compounds the errors:
SmolLM2's k_quant_mixed reaches a top-1 agreement of 0.75 with its own dequantised weights, this 0.98.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BLOCK = 32
# Digits per offset: 2 carry ~8 bits of it (SmolLM2 top-1 1.0 with an fp32 head, 3 digits 0.983: noise);
# rounding the offset to a whole level instead (integer zero points) gives 0.73.
DIGITS = 2
ACCURACY_LEVEL = 4  # int8 compute on CPU, as exporters.quantize
_TOLERANCE = 1e-6  # of the block's largest weight: dequantisation in fp32 rounds to about 1e-7


@dataclass(frozen=True)
class Grid:
    """One weight [K, N] as 4-bit levels per block of 32 along K: ``w = scale * q + low``."""

    q: npt.NDArray[np.uint8]  # [N, K / 32, 32], 0..15
    scale: npt.NDArray[np.float32]  # [N, K / 32]
    low: npt.NDArray[np.float32]  # [N, K / 32]


def find_grid(w: npt.NDArray[np.float32]) -> Grid | None:
    """The grid ``w`` lies on, or None. Blocks whose extremes are levels 0 and 15 (Q4_1) are read from
    their minimum and maximum; the others (Q4_0 and Q4_K leave levels unused) from the smallest step
    between their distinct values."""
    k, n = w.shape
    if w.dtype.kind != "f" or w.dtype.itemsize < 2 or k % BLOCK:
        return None
    b = np.ascontiguousarray(w.T, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    low = b.min(axis=2)
    tol = _TOLERANCE * np.maximum(np.abs(b).max(axis=2), np.float32(1e-30))
    step = (b.max(axis=2) - low) / 15
    fits = _fits(b, low, step, tol)
    if not fits.all():  # fall back block by block to the smallest step between distinct values
        s = np.sort(b[~fits], axis=1)
        gaps = np.diff(s, axis=1)
        gaps[gaps <= tol[~fits][:, None]] = np.inf
        smallest = gaps.min(axis=1)
        step[~fits] = np.where(np.isfinite(smallest), smallest, 0)
        fits = _fits(b, low, step, tol)  # the blocks that fitted before still do: their step is kept
        if not fits.all():
            return None
    safe = np.where(step == 0, 1, step)
    q = np.rint((b - low[..., None]) / safe[..., None])
    return Grid(q.astype(np.uint8), step.astype(np.float32), low.astype(np.float32))


def source_on_grid(src: Path) -> bool:
    """Whether any projection of a Hugging Face folder's first layer lies on a 4-bit grid (read from its
    safetensors, not loading the model): the probe that picks this path before the builder runs. The
    whole first layer, since mixes such as Q4_K_M give its V and down projections 6 bits."""
    from safetensors import safe_open

    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            names = [k for k in f.keys() if ".layers.0." in k and k.endswith("proj.weight")]  # noqa: SIM118
            for name in names:
                try:
                    if find_grid(f.get_tensor(name).T) is not None:
                        return True
                except TypeError:  # bfloat16, which numpy lacks: not a dequantised grid anyway
                    return False
    return False


def _fits(b: Any, low: Any, step: Any, tol: Any) -> npt.NDArray[np.bool_]:
    """Which blocks are ``low + step * q`` to ``tol``; ``step`` is refined in place by least squares on
    the levels it gives (a step read from one gap carries that gap's rounding, ~1e-6 relative)."""
    safe = np.where(step == 0, 1, step)
    q = np.rint((b - low[..., None]) / safe[..., None])
    weight = (q * q).sum(axis=2)
    fitted = ((b - low[..., None]) * q).sum(axis=2) / np.where(weight == 0, 1, weight)
    step[...] = np.where(weight == 0, step, fitted)
    err = np.abs(low[..., None] + step[..., None] * q - b).max(axis=2)
    fits: npt.NDArray[np.bool_] = (q.max(axis=2) <= 15) & (err <= tol)
    return fits


def symmetric(grid: Grid) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]] | None:
    """The grid as ``s * (level - 8)`` with no offsets, where every block allows it (Q4_0's blocks do:
    their origin is a level, their scale may be negative); None where any block needs an offset."""
    step = grid.scale.astype(np.float64)
    origin = np.where(step == 0, 0, grid.low / np.where(step == 0, 1, step))  # the block's low end, in steps
    whole = np.rint(origin)
    if (np.abs(origin - whole) > 1e-4).any():
        return None
    up = grid.q.astype(np.int64) + whole[..., None].astype(np.int64) + 8  # s = step
    down = 16 - up  # s = -step: level 8 - (q + origin)
    use_up = (up.min(axis=2) >= 0) & (up.max(axis=2) <= 15)
    use_down = (down.min(axis=2) >= 0) & (down.max(axis=2) <= 15)
    constant = grid.scale == 0  # w = low everywhere: level 0 at scale -low / 8 (or level 8 when low is 0)
    if not (use_up | use_down | constant).all():
        return None
    levels = np.where(use_up[..., None], up, down)
    scales = np.where(use_up, grid.scale, -grid.scale)
    levels[constant] = np.where(grid.low[constant] == 0, 8, 0)[:, None]
    scales[constant] = np.where(grid.low[constant] == 0, 1, -grid.low[constant] / 8)
    return levels.astype(np.uint8), scales.astype(np.float32)


def _digits(c: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Offsets [N, P] (P a multiple of 32) as DIGITS symmetric 4-bit digits, each a run of blocks:
    (levels [N, DIGITS * P], scales [N, DIGITS * P / 32])."""
    n, p = c.shape
    rest = c.reshape(n, p // BLOCK, BLOCK)
    levels, scales = [], []
    for _ in range(DIGITS):
        s = (np.abs(rest).max(axis=2) / 7.0).astype(np.float32)
        s[s == 0] = 1.0
        q = np.clip(np.rint(rest / s[..., None]), -8, 7)
        rest = rest - q * s[..., None].astype(np.float64)
        levels.append((q + 8).astype(np.uint8).reshape(n, p))
        scales.append(s)
    return np.concatenate(levels, axis=1), np.concatenate(scales, axis=1)


def _pack(q: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """[N, K] levels 0..15 -> MatMulNBits' [N, K / 32, 16] bytes, the even element in the low nibble."""
    n, k = q.shape
    blocks = q.reshape(n, k // BLOCK, BLOCK)
    packed: npt.NDArray[np.uint8] = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
    return packed


def carry(model: Any, skip: tuple[str, ...] = ("lm_head.",)) -> dict[str, Any] | None:
    """Rewrite every MatMul whose constant weight lies on a 4-bit grid (names starting with ``skip``
    excepted: the LM head is the embedding's int8 blocks) into one exact MatMulNBits. Returns what
    was done, or None (the graph untouched) when no weight lies on a grid."""
    from onnx import numpy_helper

    g = model.graph
    tables = {t.name: t for t in g.initializer}
    augmented: dict[str, str] = {}  # an input -> itself with its block sums appended (shared by consumers)
    nodes: list[Any] = []
    added: list[Any] = []
    dropped: set[str] = set()
    candidates = exact = 0
    for node in g.node:  # one weight's grid at a time: a 1.1B model's would hold a byte per weight at once
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        grid = None
        if weight in tables and not weight.startswith(skip):
            candidates += 1
            grid = find_grid(numpy_helper.to_array(tables[weight]))
        if grid is None:
            nodes.append(node)
            continue
        plain = symmetric(grid)
        x = node.input[0]
        if plain is not None:
            nodes.append(_write(node, node.input[0], *plain, added))
        else:
            if x not in augmented:
                augmented[x] = _augment(x, grid.q.shape[1], nodes, added)
            nodes.append(_exact(node, grid, augmented[x], added))
        dropped.add(weight)
        exact += 1
    if not exact:
        return None  # nothing rewritten: the graph is as it was
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept + added)
    return {
        "carried": f"{exact} of {candidates} weights on the source's 4-bit grid, written exactly",
        "offsets": f"{DIGITS} 4-bit digit blocks per block of 32, against the activations' block sums"
        if augmented
        else None,
        "others": "int8 (weight-only, symmetric blocks of 32)" if exact < candidates else None,
    }


def _augment(x: str, blocks: int, nodes: list[Any], added: list[Any]) -> str:
    """Append ``x``'s block sums (padded to whole blocks), DIGITS times, to ``x``; return the name."""
    from onnx import helper, numpy_helper

    k, p = blocks * BLOCK, -(-blocks // BLOCK) * BLOCK
    ones = np.full((p, k), 8, np.uint8)  # row j sums block j: level 15 at scale 1/7 is 1, level 8 is 0
    ones[np.arange(k) // BLOCK, np.arange(k)] = 15
    scales = np.full((p, blocks), 1 / 7, np.float32)
    name = "/grid/" + x.strip("/").replace("/", "_")
    added += [
        numpy_helper.from_array(_pack(ones), name + "/sums_Q4"),
        numpy_helper.from_array(scales, name + "/sums_scales"),
    ]
    nodes.append(_nbits(name + "/BlockSums", [x, name + "/sums_Q4", name + "/sums_scales"], name + "/sums", k, p))
    nodes.append(
        helper.make_node(
            "Concat", [x] + [name + "/sums"] * DIGITS, [name + "/augmented"], name=name + "/Augment", axis=-1
        )
    )
    return name + "/augmented"


def _exact(node: Any, grid: Grid, x: str, added: list[Any]) -> Any:
    n, blocks, _ = grid.q.shape
    k, p = blocks * BLOCK, -(-blocks // BLOCK) * BLOCK
    offsets = np.zeros((n, p), np.float64)
    offsets[:, :blocks] = grid.low.astype(np.float64) + 8 * grid.scale.astype(np.float64)
    levels, digit_scales = _digits(offsets)
    q = np.concatenate([grid.q.reshape(n, k), levels], axis=1)
    return _write(node, x, q, np.concatenate([grid.scale, digit_scales], axis=1), added)


def _write(node: Any, x: str, q: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32], added: list[Any]) -> Any:
    """The MatMulNBits for ``node``: levels [N, K'] (or [N, K' / 32, 32]), scales [N, K' / 32]."""
    from onnx import numpy_helper

    n = q.shape[0]
    q = q.reshape(n, -1)
    base = node.input[1]
    added += [
        numpy_helper.from_array(_pack(q), base + "_Q4"),
        numpy_helper.from_array(scales.reshape(-1).astype(np.float32), base + "_scales"),
    ]
    return _nbits(node.name + "_Q4", [x, base + "_Q4", base + "_scales"], node.output[0], q.shape[1], n)


def _nbits(name: str, inputs: list[str], output: str, k: int, n: int) -> Any:
    from onnx import helper

    return helper.make_node(
        "MatMulNBits", inputs, [output], name=name, domain="com.microsoft",
        K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL,
    )  # fmt: skip
