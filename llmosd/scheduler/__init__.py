from llmosd.scheduler.batcher import BatcherClosed, BatchPolicy, DynamicBatcher, QueueFull
from llmosd.scheduler.pool import ModelPool, ServedModel

__all__ = ["BatchPolicy", "BatcherClosed", "DynamicBatcher", "ModelPool", "QueueFull", "ServedModel"]
