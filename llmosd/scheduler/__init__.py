from llmosd.runtime.backend import InvalidInput
from llmosd.runtime.chat import ROLES, Message
from llmosd.runtime.grammar import GrammarSpec, json_schema
from llmosd.runtime.sampling import DEFAULT_RANGES, MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob, merge_defaults
from llmosd.runtime.tools import Tool, ToolCall, ToolCallStream, parse_tool_calls
from llmosd.runtime.tools import grammar as tool_grammar
from llmosd.scheduler.batcher import BatchPolicy, DynamicBatcher
from llmosd.scheduler.errors import BatcherClosed, QueueFull
from llmosd.scheduler.generation import (
    Chunk,
    GenerationEngine,
    GenerationLimits,
    GenerationRequest,
    GenerationStream,
    GrammarFailed,
    RequestTooLarge,
)
from llmosd.scheduler.pool import ModelPool
from llmosd.scheduler.prepare import (
    GenerationOptions,
    InvalidRequest,
    Prepared,
    prepare_chat,
    prepare_completion,
    start,
)
from llmosd.scheduler.served import Instance, ServedModel

# The API's vocabulary for generation requests: what it parses into, what it formats from.
__all__ = [
    "DEFAULT_RANGES",
    "MAX_TOP_LOGPROBS",
    "ROLES",
    "BatchPolicy",
    "BatcherClosed",
    "Chunk",
    "DynamicBatcher",
    "GenerationEngine",
    "GenerationLimits",
    "GenerationOptions",
    "GenerationRequest",
    "GenerationStream",
    "GrammarFailed",
    "GrammarSpec",
    "Instance",
    "InvalidInput",
    "InvalidRequest",
    "Message",
    "ModelPool",
    "Prepared",
    "QueueFull",
    "RequestTooLarge",
    "SamplingParams",
    "ServedModel",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallStream",
    "json_schema",
    "merge_defaults",
    "parse_tool_calls",
    "prepare_chat",
    "prepare_completion",
    "start",
    "tool_grammar",
]
