"""Fault injection into a live worker, for the debug API and the tests: the next ``times`` calls of one
stage of its loop raise ``InjectedFault``, a BaseException, as a crash in a native extension would: no
``except Exception`` in the worker catches it, so the thread dies and its supervisor must take over."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from llmosd.scheduler.batcher import DynamicBatcher
from llmosd.scheduler.generation import GenerationEngine
from llmosd.scheduler.tensor_batcher import TensorBatcher

STAGES = ("collect", "run", "deliver")
_METHODS: dict[type, dict[str, str]] = {
    DynamicBatcher: {"collect": "_collect", "run": "_run", "deliver": "_deliver"},
    TensorBatcher: {"collect": "_take", "run": "_run", "deliver": "_deliver"},
    GenerationEngine: {"collect": "_take", "run": "_step", "deliver": "_deliver"},
}


class InjectedFault(BaseException):
    pass


def inject(worker: DynamicBatcher[Any] | TensorBatcher | GenerationEngine, stage: str, times: int = 1) -> None:
    """Make the worker's ``stage`` raise on its next ``times`` calls (then behave again)."""
    name = _METHODS[type(worker)][stage]
    original: Callable[..., Any] = getattr(type(worker), name).__get__(worker)
    left = [times]
    lock = threading.Lock()

    def faulty(*args: Any, **kwargs: Any) -> Any:
        with lock:
            fire = left[0] > 0
            left[0] -= fire
        if fire:
            raise InjectedFault(f"fault injected in the {stage} stage")
        return original(*args, **kwargs)

    setattr(worker, name, faulty)
