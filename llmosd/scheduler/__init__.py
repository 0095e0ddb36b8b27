from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.scheduler.errors import BatcherClosed, QueueFull
from llmosd.scheduler.generation import (
    Chunk,
    GenerationEngine,
    GenerationLimits,
    GenerationRequest,
    GenerationStream,
    RequestTooLarge,
)
from llmosd.scheduler.pool import ModelPool
from llmosd.scheduler.served import Instance, ServedModel

__all__ = [
    "BatchPolicy",
    "BatcherClosed",
    "Chunk",
    "DynamicBatcher",
    "GenerationEngine",
    "GenerationLimits",
    "GenerationRequest",
    "GenerationStream",
    "Instance",
    "ModelPool",
    "QueueFull",
    "RequestTooLarge",
    "ServedModel",
]
