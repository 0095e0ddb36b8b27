"""Giving an ONNX Runtime session's arena memory back. ORT's arena keeps the high-water mark of every
run for good: one batch of 64 long inputs (or an autotune calibration) held about 250 MB more, for the
life of the process, on MiniLM alone. A run carrying the shrinkage run option frees the arena's unused
regions when it ends (measured here: 395 MB -> 153 MB after a batch of 64 x 128 tokens); the workers
make such a run, on a tiny input, once they have been idle a moment after real work, and then ask
glibc to return the free pages of its heaps (malloc_trim: 616 MB -> 475 MB after SmolLM2's calibration,
whose caches numpy had freed but the heap kept). And glibc's mmap threshold is fixed at start: left
dynamic, it climbs after the first large frees, so later KV caches and arena regions come from the heap,
fragment it, and an idle daemon's RSS wandered by ±4 % from one load round to the next (fixed at 1 MiB:
within 0.2 %, decode speed unchanged within noise)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)
IDLE_RELEASE_S = 2.0  # idle this long after work, a worker gives its session's spare arena memory back


def shrink_options(session: Any) -> ort.RunOptions:
    """RunOptions that shrink the arenas of the devices ``session`` runs on when the run ends."""
    devices = ["cpu:0"]
    cuda = session.get_provider_options().get("CUDAExecutionProvider")
    if cuda is not None and session.get_providers()[0] == "CUDAExecutionProvider":
        devices.append(f"gpu:{int(cuda.get('device_id', 0))}")
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", ";".join(devices))
    return options


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Return the C heap's free pages to the system, where the C library can (glibc; musl has no
    malloc_trim, and there this does nothing)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``size`` or more with its own mapping, returned to the system when
    freed (glibc: mallopt(M_MMAP_THRESHOLD), which also stops the threshold's dynamic growth). Call it
    at start, before the large allocations; False where the C library has no mallopt."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, size) == 1)


def release_quietly(release: Callable[[], None], what: str) -> None:
    """Run an idle worker's ``release``; a failure there is logged, never the death of the worker (a
    worker that died each time it idled would be given up on, for a memory nicety)."""
    try:
        release()
    except Exception as exc:
        log.warning("could not give %s's spare memory back: %r", what, exc)
