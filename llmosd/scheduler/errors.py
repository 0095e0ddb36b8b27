"""What the schedulers refuse with; the API maps these to 429 and 503."""

from __future__ import annotations


class QueueFull(Exception):
    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(f"model {model!r} is busy: its queue is full")
        self.retry_after = retry_after


class BatcherClosed(Exception):
    """The model is being unloaded or the daemon is stopping."""


class ModelUnavailable(Exception):
    """A model in the store could not be loaded on demand (a corrupt file, a CUDA-only artifact on a CPU)."""
