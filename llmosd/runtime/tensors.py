"""Raw tensors in, raw tensors out: any loaded ONNX session described and run with named arrays, for the
Open Inference Protocol (/v2). Datatype names are KServe's (FP32, INT64, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64",
    "tensor(uint32)": "UINT32",
    "tensor(uint16)": "UINT16",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT64": np.uint64,
    "UINT32": np.uint32,
    "UINT16": np.uint16,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


class TensorError(ValueError):
    """The tensors do not match the model's inputs (the message says which and how)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the dimension is dynamic

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, ONNX_TYPES.get(node.type, node.type), shape)


class TensorModel:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = tuple(_spec(i) for i in session.get_inputs())
        self.outputs = tuple(_spec(o) for o in session.get_outputs())
        # Requests can be stacked on the first axis when every input and output has a dynamic first one.
        self.batchable = all(s.shape and s.shape[0] == -1 for s in (*self.inputs, *self.outputs))

    def check(self, feeds: Mapping[str, npt.NDArray[Any]], wanted: list[str] | None) -> None:
        by_name = {s.name: s for s in self.inputs}
        unknown = sorted(set(feeds) - set(by_name))
        if unknown:
            raise TensorError(f"unknown input(s) {unknown}; the model takes {sorted(by_name)}")
        for name, array in feeds.items():
            spec = by_name[name]
            if NUMPY_TYPES.get(spec.datatype) != array.dtype.type:
                raise TensorError(f"input {name!r} must be {spec.datatype}")
            if len(spec.shape) != array.ndim or any(
                d not in (-1, n) for d, n in zip(spec.shape, array.shape, strict=True)
            ):
                raise TensorError(f"input {name!r} has shape {list(array.shape)}; the model takes {list(spec.shape)}")
        missing = sorted(set(by_name) - set(feeds))
        if missing:
            raise TensorError(f"missing input(s) {missing}")
        if self.batchable and len({a.shape[0] for a in feeds.values()}) > 1:
            raise TensorError("the inputs disagree on the first (batch) dimension")
        outputs = {s.name for s in self.outputs}
        for name in wanted or []:
            if name not in outputs:
                raise TensorError(f"unknown output {name!r}; the model gives {sorted(outputs)}")

    def run(self, feeds: Mapping[str, npt.NDArray[Any]], options: Any = None) -> dict[str, npt.NDArray[Any]]:
        names = [s.name for s in self.outputs]
        return dict(zip(names, self.session.run(names, dict(feeds), options), strict=True))
