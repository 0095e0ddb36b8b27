"""Tasks as plugins: the contract a task package implements, and the registry that finds them.

A third-party package imports what it needs from here (and, for its routes, from ``llmosd.api.tasks``).
"""

from llmosd.runtime.adapters import Adapting
from llmosd.runtime.backend import Input, InvalidInput, Output
from llmosd.runtime.tasks import EncoderModel
from llmosd.runtime.tokenizer import Batch, TextTokenizer
from llmosd.tasks.contract import INVARIANT, PRECISIONS, Checked, Export, Source, Task, Tolerance, deferred
from llmosd.tasks.registry import GROUP, Tasks, discover

__all__ = [
    "GROUP",
    "INVARIANT",
    "PRECISIONS",
    "Adapting",
    "Batch",
    "Checked",
    "EncoderModel",
    "Export",
    "Input",
    "InvalidInput",
    "Output",
    "Source",
    "Task",
    "Tasks",
    "TextTokenizer",
    "Tolerance",
    "deferred",
    "discover",
]
