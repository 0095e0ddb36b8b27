"""A causal LM over a fused decoder graph (onnxruntime-genai's model builder: GroupQueryAttention with
rotary inside, packed QKV, fused norms, MatMulNBits), its KV cache written in place.

The cache is one preallocated array per past input, ``[slots, kv_heads, max_len, head_dim]``. A row
owns a slot; each run binds the same memory as the layer's ``past`` and its ``present``, and
GroupQueryAttention (which sees the shared buffer) writes the new positions into it: no copy per step,
none when a row joins or leaves. A decode step binds slots ``0..highest used`` as one batch; a free
slot among them runs as a dummy row of one position (its logits are ignored). Each row's attention
mask is right-padded with as many ones as the row has positions, so rows at different lengths decode
together and GroupQueryAttention takes each row's length from it.

The arrays are an anonymous mapping reserved without backing (MAP_NORESERVE): a slot's pages exist
once positions are written, so memory follows what the rows use, and a freed slot's pages go back to
the system (madvise DONTNEED). A run returns the logits of the last position only (the builder's
``prune_lm_head``), or of the last ``logits_to_keep`` where the recipe's graph takes that input and a
prompt is scored.
"""

from __future__ import annotations

import heapq
import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from llmosd.runtime.decoder import FloatArray
from llmosd.runtime.memory import shrink_options, trim_heap
from llmosd.runtime.prefix_cache import BLOCK, Block, PrefixCache

_DTYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11 does not export it
_PAGE = mmap.PAGESIZE
KEEP_INPUT = "logits_to_keep"  # exporters.fused.KEEP_INPUT (the exporters are not imported at serving)


def is_fused(session: Any) -> bool:
    """A builder graph: past/present per layer, an attention mask, and no position ids (rotary runs
    inside GroupQueryAttention from the mask's lengths)."""
    names = {i.name for i in session.get_inputs()}
    return "attention_mask" in names and "position_ids" not in names and "past_key_values.0.key" in names


class FusedLM:
    def __init__(self, session: Any, vocab_size: int, slots: int, max_len: int, prefix_cache: bool = False) -> None:
        if slots < 1 or max_len < 2:
            raise ValueError(f"a fused decoder needs a slot and two positions (got {slots} rows of {max_len})")
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self._past = tuple(n for n in inputs if n.startswith("past_key_values."))
        self._present = tuple(n.replace("past_key_values.", "present.") for n in self._past)
        _, heads, _, dim = inputs[self._past[0]].shape
        self.kv_heads, self.head_dim = int(heads), int(dim)
        self.dtype = _DTYPES.get(inputs[self._past[0]].type, np.float32)
        itemsize = np.dtype(self.dtype).itemsize
        self.bytes_per_token = len(self._past) * self.kv_heads * self.head_dim * itemsize
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab_size = int(logits.shape[-1]) if isinstance(logits.shape[-1], int) else vocab_size
        self.slots, self.max_len = slots, max_len
        self.chunks = True  # a prompt runs in pieces, each against the positions before it
        # Positions whose logits one run returns: the recipe's graphs take ``logits_to_keep``
        # (exporters.fused.keep_logits); older ones return the last position's only.
        self._keeps = KEEP_INPUT in inputs
        self.logits_kept = max_len if self._keeps else 1
        self.capacity = slots
        self._slot_bytes = self.kv_heads * max_len * self.head_dim * itemsize
        self._array_bytes = slots * self._slot_bytes
        self._map = mmap.mmap(
            -1,
            self._array_bytes * len(self._past),
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
        )
        count = slots * self.kv_heads * max_len * self.head_dim
        self._arrays = [
            np.frombuffer(self._map, self.dtype, count, i * self._array_bytes).reshape(
                slots, self.kv_heads, max_len, self.head_dim
            )
            for i in range(len(self._past))
        ]
        self._views: dict[tuple[int, int], list[Any]] = {}  # (first slot, end) -> one OrtValue per array
        self.lengths = [0] * slots  # positions written, per slot
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first
        self._used: set[int] = set()
        # Rows a decode step runs at least: 2 where a lone row's kernels differ from a batch's (AVX2's
        # MatMulNBits takes another path at M = 1), so that a row alone is decoded as in a batch.
        # settle_lone_rows() measures which, at load.
        self.min_rows = 1
        # Prompts' leading blocks, copied into a new row instead of prefilled (GroupQueryAttention runs
        # the rest of the prompt against them as a "subsequent prompt").
        self.prefix = PrefixCache(self.bytes_per_token) if prefix_cache else None

    # --- the Decoder contract --------------------------------------------------------------------

    def prefill(self, ids: Sequence[int]) -> tuple[FloatArray, int]:
        slot, cached = self.open(ids)
        try:
            logits = self.extend(slot, ids[cached:])
            self.remember(slot, ids)
        except BaseException:
            self.free(slot)
            raise
        return logits[-1], slot

    def open(self, ids: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """A slot for this prompt, with the prefix cache's blocks it starts with copied in where ``reuse``
        (not where every position's logits are wanted: cached ones have none)."""
        n = len(ids)
        if not 0 < n < self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache row of {self.max_len} positions")
        if not self._free:
            raise RuntimeError(f"all {self.slots} cache rows are in use")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        try:
            cached = self._copy_in(slot, self.prefix.match(ids)) if reuse and self.prefix is not None else 0
        except BaseException:
            self.free(slot)
            raise
        self.lengths[slot] = cached
        return slot, cached

    def extend(self, row: int, ids: Sequence[int], keep: int = 1) -> FloatArray:
        """Run ``ids`` after the row's positions (GroupQueryAttention's "subsequent prompt": a chunk of a
        prompt against the chunks before it); ``[keep, vocab]``, the logits of the last ``keep``."""
        n = self.lengths[row] + len(ids)
        if row not in self._used or not ids or n >= self.max_len:
            raise ValueError(f"{len(ids)} more positions do not fit row {row} of {self.max_len}")
        if not 1 <= keep <= min(len(ids), self.logits_kept):
            raise ValueError(f"a run of {len(ids)} positions returns 1 to {self.logits_kept} positions' logits")
        logits = self._run(row, row + 1, np.asarray([ids], np.int64), np.ones((1, n), np.int64), keep)
        self.lengths[row] = n
        out: FloatArray = logits[0]
        return out

    def remember(self, row: int, ids: Sequence[int]) -> None:
        """Keep the prompt's whole blocks, now in the row, for prompts that start alike."""
        if self.prefix is not None:
            self.prefix.store(ids, lambda b: self._copy_out(row, b))

    def _copy_in(self, slot: int, blocks: list[Block]) -> int:
        for b, block in enumerate(blocks):
            for a, part in zip(self._arrays, block, strict=True):
                a[slot, :, b * BLOCK : (b + 1) * BLOCK] = part
        return len(blocks) * BLOCK

    def _copy_out(self, slot: int, b: int) -> Block:
        return [a[slot, :, b * BLOCK : (b + 1) * BLOCK].copy() for a in self._arrays]

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> FloatArray:
        if max(self.lengths[r] for r in rows) + 1 > self.max_len:
            raise ValueError(f"a row would pass its {self.max_len} cache positions")
        end = min(max(max(rows) + 1, self.min_rows), self.slots)
        # Every slot up to the highest asked runs. A free one is a one-position dummy. A row in use but not
        # asked (a prompt being scored one position a run beside running rows) runs at its own length: it
        # writes only its next position, which its own next step overwrites (a dummy would have written
        # over its first position). A full row, which never runs again, writes over its last.
        span = [min(self.lengths[r], self.max_len - 1) + 1 if r in self._used else 1 for r in range(end)]
        ids = np.zeros((end, 1), np.int64)
        mask = np.zeros((end, max(span)), np.int64)
        for r, n in enumerate(span):
            mask[r, :n] = 1
        for r, t in zip(rows, tokens, strict=True):
            ids[r, 0] = t
        logits = self._run(0, end, ids, mask)[:, -1]
        for r in rows:
            self.lengths[r] += 1
        out: FloatArray = logits[np.asarray(rows)]
        return out

    def fork(self, row: int) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.slots} cache rows are in use")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        n = self.lengths[row]
        for a in self._arrays:
            a[slot, :, :n] = a[row, :, :n]
        self.lengths[slot] = n
        return slot

    def free(self, row: int) -> None:
        if row in self._used:
            self._used.discard(row)
            self.lengths[row] = 0
            heapq.heappush(self._free, row)
            self._forget(row)

    def reset(self) -> None:
        for row in list(self._used):
            self.free(row)
        if self.prefix is not None:  # after a failed step: what was kept may be half written
            self.prefix.clear()

    def reserved_bytes(self, reserves: Sequence[int]) -> int:
        """Each row holds only its own positions."""
        return sum(reserves) * self.bytes_per_token

    def release(self) -> None:
        """The arena's spare memory back (a one-token run that shrinks it as it ends), and the pages of
        every free slot (those a dummy row wrote included)."""
        for slot in self._free:
            self._forget(slot)
        if self._free:
            slot = self._free[0]
            io = self._binding(slot, slot + 1, np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64))
            self.session.run_with_iobinding(io, shrink_options(self.session))
            self._forget(slot)
        trim_heap()

    # --- runs --------------------------------------------------------------------------------------

    def _run(
        self, start: int, end: int, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], keep: int = 1
    ) -> FloatArray:
        """``[rows, keep, vocab]``: the logits of each row's last ``keep`` positions."""
        io = self._binding(start, end, ids, mask, keep)
        self.session.run_with_iobinding(io)
        logits: FloatArray = io.get_outputs()[0].numpy()[:, -keep:].astype(np.float32, copy=False)
        return logits

    def _binding(
        self, start: int, end: int, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], keep: int = 1
    ) -> Any:
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        if self._keeps:
            io.bind_cpu_input(KEEP_INPUT, np.asarray([keep], np.int64))
        for past, present, value in zip(self._past, self._present, self._slot_values(start, end), strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # the same memory: written in place
        return io

    def _slot_values(self, start: int, end: int) -> list[Any]:
        key = (start, end)
        if key not in self._views:  # ORT values over the arrays' own memory (no copy on CPU)
            self._views[key] = [ort.OrtValue.ortvalue_from_numpy(a[start:end]) for a in self._arrays]
        return self._views[key]

    def _forget(self, slot: int) -> None:
        """Return a slot's pages to the system; they read as zeros when touched again."""
        for i in range(len(self._arrays)):
            begin = i * self._array_bytes + slot * self._slot_bytes
            first = -(-begin // _PAGE) * _PAGE
            last = (begin + self._slot_bytes) // _PAGE * _PAGE
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
