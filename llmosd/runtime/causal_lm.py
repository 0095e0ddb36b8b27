"""A causal LM over an optimum text-generation-with-past export: prefill, and batched one-token decode
steps over a key/value cache that rows join and leave between steps.

The cache of a running batch is one array per past input, ``[rows, kv_heads, width, head_dim]``, each
row right-aligned: row ``i`` holds its ``lengths[i]`` real positions in the last columns and padding
(masked out by ``attention_mask``) before them. The graph appends the new position itself (its
``present`` outputs are the past plus one column), so a decode step hands the outputs straight back
as the next step's inputs; copies happen only when rows join or leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from llmosd.runtime.memory import shrink_options, trim_heap
from llmosd.runtime.prefix_cache import PrefixCache

FloatArray = npt.NDArray[np.float32]
_DTYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class CacheLayout:
    past_names: tuple[str, ...]  # past_key_values.{layer}.{key|value}, in the graph's order
    present_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    dtype: type[np.floating[Any]]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one position of one sequence takes, all layers, keys and values."""
        return len(self.past_names) * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize


@dataclass
class KVCache:
    """The cache of the running rows (see the module docstring for the layout)."""

    arrays: list[Any]  # numpy arrays, or ORT values where IO binding left them on the device
    lengths: list[int]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return (
            int(self.arrays[0].shape()[2] if isinstance(self.arrays[0], ort.OrtValue) else self.arrays[0].shape[2])
            if self.arrays
            else 0
        )


class CausalLM:
    def __init__(self, session: Any, vocab_size: int | None = None, io_binding: bool | None = None) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        past = tuple(n for n in inputs if n.startswith("past_key_values."))
        if not past or "logits" not in outputs:
            raise ValueError("not a text-generation-with-past export: no past_key_values inputs or logits output")
        _, heads, _, dim = inputs[past[0]].shape
        self.layout = CacheLayout(
            past_names=past,
            present_names=tuple(n.replace("past_key_values.", "present.") for n in past),
            kv_heads=int(heads),
            head_dim=int(dim),
            dtype=_DTYPES.get(inputs[past[0]].type, np.float32),
        )
        missing = set(self.layout.present_names) - set(outputs)
        if missing:
            raise ValueError(f"export lacks outputs {sorted(missing)}")
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        self._outputs = ["logits", *self.layout.present_names]
        self._device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # present stays on the GPU the session runs on (placement may put instances on any of them)
        cuda_options = session.get_provider_options().get("CUDAExecutionProvider", {})
        self._device_id = int(cuda_options.get("device_id", 0))
        self._bind = io_binding if io_binding is not None else self._device == "cuda"
        vocab = session.get_outputs()[outputs.index("logits")].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else int(vocab_size or 0)

    def empty_cache(self) -> KVCache:
        return KVCache([], [])

    def prefill(self, ids: Sequence[int]) -> tuple[FloatArray, KVCache]:
        """Run a whole prompt as a one-row batch; return the last position's logits and its cache."""
        logits, cache = self.prefill_kept(ids, 1)
        return logits[-1], cache

    def prefill_kept(self, ids: Sequence[int], keep: int) -> tuple[FloatArray, KVCache]:
        """The same, with the logits of the last ``keep`` positions (``[keep, vocab]``; optimum's graphs
        compute them all anyway)."""
        n = len(ids)
        shape = (1, self.layout.kv_heads, 0, self.layout.head_dim)
        past = [np.zeros(shape, dtype=self.layout.dtype) for _ in self.layout.past_names]
        feeds = self._feeds(np.array([ids], dtype=np.int64), past, np.ones((1, n), np.int64), np.arange(n)[None, :])
        logits, present = self._run(feeds)
        return logits[0, n - keep :].astype(np.float32, copy=False), KVCache(present, [n])

    def decode(self, cache: KVCache, tokens: Sequence[int]) -> tuple[FloatArray, KVCache]:
        """One step for every row: feed each row's last token, return ``[rows, vocab]`` logits and the cache."""
        width = cache.width
        lengths = np.array(cache.lengths, dtype=np.int64)
        mask = (np.arange(width + 1)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
        ids = np.array(tokens, dtype=np.int64)[:, None]
        logits, present = self._run(self._feeds(ids, cache.arrays, mask, lengths[:, None]))
        return logits[:, -1].astype(np.float32, copy=False), KVCache(present, [n + 1 for n in cache.lengths])

    def _feeds(
        self, ids: npt.NDArray[np.int64], past: list[npt.NDArray[Any]], mask: npt.NDArray[np.int64], positions: Any
    ) -> dict[str, Any]:
        feeds: dict[str, Any] = {"input_ids": ids, **dict(zip(self.layout.past_names, past, strict=True))}
        if self._has_mask:
            feeds["attention_mask"] = mask
        if self._has_positions:
            feeds["position_ids"] = np.ascontiguousarray(positions, dtype=np.int64)
        return feeds

    def release(self) -> None:
        """Give the arena's spare memory back: a one-token prefill that shrinks it as it ends."""
        shape = (1, self.layout.kv_heads, 0, self.layout.head_dim)
        past = [np.zeros(shape, dtype=self.layout.dtype) for _ in self.layout.past_names]
        feeds = self._feeds(np.array([[0]], dtype=np.int64), past, np.ones((1, 1), np.int64), np.zeros((1, 1)))
        self.session.run(self._outputs, {k: np.asarray(v) for k, v in feeds.items()}, shrink_options(self.session))
        trim_heap()

    def _run(self, feeds: dict[str, Any]) -> tuple[FloatArray, list[Any]]:
        """One session run. With IO binding the present key/values stay where the provider wrote them
        (ORT values, on the GPU under CUDA) and go back in as the next step's past; only the logits
        come to the host."""
        if not self._bind:
            out = self.session.run(self._outputs, feeds)
            return out[0], list(out[1:])
        io = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_output("logits", "cpu")
        for name in self.layout.present_names:
            io.bind_output(name, self._device, self._device_id)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])


def _host(value: Any) -> npt.NDArray[Any]:
    """A cache array on the host (copied from the device when the provider kept it there)."""
    out: npt.NDArray[Any] = value.numpy() if isinstance(value, ort.OrtValue) else value
    return out


def merge(cache: KVCache, joining: Sequence[KVCache]) -> KVCache:
    """The running rows followed by the joining ones, all right-aligned in one cache."""
    parts = [c for c in (cache, *joining) if c.rows]
    if len(parts) == 1:
        return parts[0]
    width = max(c.width for c in parts)
    rows = sum(c.rows for c in parts)
    arrays = []
    for i in range(len(parts[0].arrays)):
        layers = [_host(c.arrays[i]) for c in parts]
        _, heads, _, dim = layers[0].shape
        out = np.zeros((rows, heads, width, dim), dtype=layers[0].dtype)
        r = 0
        for c, layer in zip(parts, layers, strict=True):
            out[r : r + c.rows, :, width - c.width :] = layer
            r += c.rows
        arrays.append(out)
    return KVCache(arrays, [n for c in parts for n in c.lengths])


def keep_rows(cache: KVCache, keep: Sequence[int]) -> KVCache:
    """Only the given rows, with the columns no remaining row uses cut off the left."""
    if not keep:
        return KVCache([], [])
    if len(keep) == cache.rows:
        return cache
    lengths = [cache.lengths[i] for i in keep]
    start = cache.width - max(lengths)
    index = np.array(keep, dtype=np.int64)
    arrays = [np.ascontiguousarray(_host(a)[index, :, start:]) for a in cache.arrays]
    return KVCache(arrays, lengths)


class RightAlignedRows:
    """The engine's ``Decoder`` over a ``CausalLM``: the running rows are one right-aligned cache that
    joining rows are merged into, and leaving ones cut out of, at the next step (one copy per change)."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm
        self.vocab_size = lm.vocab_size
        self.bytes_per_token = lm.layout.bytes_per_token
        self.dtype = lm.layout.dtype
        self.capacity = 1 << 30  # only the KV budget bounds it
        self.prefix: PrefixCache | None = None  # optimum's graphs run a prompt from position 0 only
        self.chunks = False  # ... so a prompt runs whole, in one piece
        self.logits_kept = 1 << 30  # and every position's logits come out of that run
        self._empty: set[int] = set()  # rows opened whose prompt has not run
        self._order: list[int] = []  # the rows of ``_cache``, in its order
        self._cache = lm.empty_cache()
        self._joining: dict[int, KVCache] = {}
        self._live: set[int] = set()  # rows not freed
        self._next = 0

    def prefill(self, ids: Sequence[int]) -> tuple[FloatArray, int]:
        logits, cache = self.lm.prefill(ids)
        return logits, self._add(cache)

    def open(self, ids: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """A row with nothing in it yet: its prompt runs whole, in its one ``extend``."""
        row = self._new_row()
        self._empty.add(row)
        return row, 0

    def extend(self, row: int, ids: Sequence[int], keep: int = 1) -> FloatArray:
        if row not in self._empty:
            raise ValueError("optimum's graphs run a prompt from position 0 only: this row has positions")
        logits, cache = self.lm.prefill_kept(ids, keep)
        self._empty.discard(row)
        self._joining[row] = cache
        return logits

    def remember(self, row: int, ids: Sequence[int]) -> None:
        """No prefix cache for this layout."""

    def _add(self, cache: KVCache) -> int:
        row = self._new_row()
        self._joining[row] = cache
        return row

    def _new_row(self) -> int:
        row, self._next = self._next, self._next + 1
        self._live.add(row)
        return row

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> FloatArray:
        joining = [r for r in rows if r in self._joining]
        if joining:
            self._cache = merge(self._cache, [self._joining.pop(r) for r in joining])
            self._order.extend(joining)
        if list(rows) != self._order:  # rows left (or the engine asks in another order): one copy
            where = {r: i for i, r in enumerate(self._order)}
            self._cache = keep_rows(self._cache, [where[r] for r in rows])
            self._order = list(rows)
        logits, self._cache = self.lm.decode(self._cache, tokens)
        return logits

    def fork(self, row: int) -> int:
        if row in self._joining:
            return self._add(self._joining[row])
        i = self._order.index(row)
        return self._add(keep_rows(self._cache, [i]) if self._cache.rows > 1 else self._cache)

    def free(self, row: int) -> None:
        self._joining.pop(row, None)  # a running row is cut out at the next decode
        self._live.discard(row)
        self._empty.discard(row)

    def reset(self) -> None:
        self._order, self._cache, self._joining, self._live = [], self.lm.empty_cache(), {}, set()
        self._empty = set()

    def reserved_bytes(self, reserves: Sequence[int]) -> int:
        """Every row is as wide as the widest: the layout right-aligns them in one array."""
        return len(reserves) * max(reserves, default=0) * self.bytes_per_token

    def release(self) -> None:
        if not self._live:  # the last rows left: their cache is garbage
            self.reset()
        self.lm.release()
