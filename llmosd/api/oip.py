"""The Open Inference Protocol (KServe v2, what Triton speaks) under /v2: raw tensors for any loaded ONNX
model, JSON or Triton's binary tensor extension (``Inference-Header-Content-Length``), so
``tritonclient.http`` works unchanged. Inference goes through the model's tensor batcher."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from llmosd import __version__
from llmosd.api.decode import decode_json_off_loop
from llmosd.api.errors import ApiError, bad_request, kserve_error
from llmosd.api.metrics import MODEL_KEY
from llmosd.api.ops import worker_problems
from llmosd.api.requests import read_body
from llmosd.api.state import hold, state
from llmosd.runtime.tensors import NUMPY_TYPES, TensorError, TensorModel
from llmosd.scheduler import ServedModel

routes = web.RouteTableDef()
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ELEMENTS = 1 << 24  # per tensor: a shape can promise far more than a body of max_body_bytes holds


async def _served(request: web.Request) -> ServedModel:
    name = request.match_info["name"]
    request[MODEL_KEY] = name
    served = await hold(request, name)
    version = request.match_info.get("version")
    if version is not None and version != str(served.loaded.manifest.version):
        raise ApiError(404, f"version {version} of model {name!r} is not loaded", type="not_found_error")
    return served


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "llmosd", "version": __version__, "extensions": ["binary_tensor_data"]})


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    st = state(request)
    if not st.ready:
        return kserve_error(503, f"not ready: {st.status_line}", "unavailable_error")
    if problems := worker_problems(st):
        return kserve_error(503, f"not ready: {'; '.join(problems)}", "unavailable_error")
    return web.json_response({"ready": True})


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    served = await _served(request)
    model = TensorModel(served.loaded.session)
    m = served.loaded.manifest
    return web.json_response(
        {
            "name": m.name,
            "versions": [str(m.version)],
            "platform": "onnxruntime_onnx",
            "inputs": [s.as_dict() for s in model.inputs],
            "outputs": [s.as_dict() for s in model.outputs],
        }
    )


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    served = await _served(request)
    return web.json_response({"name": served.loaded.name, "ready": served.healthy()})


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    st = state(request)
    served = await _served(request)
    header, binary = await _split_body(await read_body(request), request.headers.get(HEADER_LENGTH))
    feeds, wanted, binary_out = _parse(header, binary)
    try:  # every instance runs the same graph: the first one's signature checks the request
        TensorModel(served.loaded.session).check(feeds, [name for name, _ in wanted] if wanted else None)
    except TensorError as exc:
        raise bad_request(str(exc), "inputs") from None
    try:
        outputs = await served.infer_tensors(feeds, st.config.max_batch_size, st.config.max_queue)
    except Exception as exc:
        if type(exc).__module__.startswith("onnxruntime"):  # ORT refused the client's values
            message = str(exc).splitlines()[0][:300]
            raise bad_request(f"the model rejected these tensors: {message}", "inputs") from None
        raise
    names = [name for name, _ in wanted] if wanted else list(outputs)
    as_binary = {name: dict(wanted).get(name, binary_out) for name in names}
    m = served.loaded.manifest
    body: dict[str, Any] = {"model_name": m.name, "model_version": str(m.version), "outputs": []}
    if "id" in header:
        body["id"] = header["id"]
    blobs = []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": _datatype(array), "shape": list(array.shape)}
        if as_binary[name]:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = array.ravel().tolist()
        body["outputs"].append(tensor)
    text = json.dumps(body).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=text + b"".join(blobs),
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))},
    )


def _datatype(array: npt.NDArray[Any]) -> str:
    for name, kind in NUMPY_TYPES.items():
        if array.dtype.type is kind:
            return name
    raise ApiError(500, f"output dtype {array.dtype} has no KServe datatype", type="server_error")


async def _split_body(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        size = len(raw)
    elif not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(raw):
        raise bad_request(f"{HEADER_LENGTH} must be a byte count within the body")
    else:
        size = int(header_length)
    header = await decode_json_off_loop(raw[:size], "the inference request header")
    if not isinstance(header, dict):
        raise bad_request("the inference request must be a JSON object")
    return header, raw[size:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where}: 'parameters' must be an object", where)
    return value


def _parse(header: dict[str, Any], binary: bytes) -> tuple[dict[str, npt.NDArray[Any]], list[tuple[str, bool]], bool]:
    """(input arrays, requested outputs with their binary flag, the default binary flag)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors", "inputs")
    feeds: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise bad_request(f"{where} must be an object with name, shape, datatype and data", where)
        array, offset = _tensor(tensor, where, binary, offset)
        feeds[tensor["name"]] = array
    params = _parameters(header.get("parameters"), "the request")
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise bad_request("'binary_data_output' must be true or false", "parameters")
    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise bad_request("'outputs' must be a list of objects with a name", "outputs")
    wanted = []
    for k, out in enumerate(outputs or []):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise bad_request("'outputs' must be a list of objects with a name", "outputs")
        flag = _parameters(out.get("parameters"), f"outputs[{k}]").get("binary_data", binary_out)
        if not isinstance(flag, bool):
            raise bad_request(f"outputs[{k}]: 'binary_data' must be true or false", "outputs")
        wanted.append((out["name"], flag))
    return feeds, wanted, binary_out


def _tensor(tensor: dict[str, Any], where: str, binary: bytes, offset: int) -> tuple[npt.NDArray[Any], int]:
    """One input tensor, checked before any conversion; and the offset of the next binary input."""
    dtype = NUMPY_TYPES.get(str(tensor.get("datatype")))
    shape = tensor.get("shape")
    if dtype is None:
        raise bad_request(f"{where}: datatype must be one of {', '.join(NUMPY_TYPES)}", where)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad_request(f"{where}: shape must be a list of non-negative integers", where)
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise bad_request(f"{where}: shape holds {count} elements, more than {MAX_ELEMENTS}", where)
    size = _parameters(tensor.get("parameters"), where).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise bad_request(f"{where}: binary_data_size runs past the body", where)
        if size != count * np.dtype(dtype).itemsize:
            raise bad_request(f"{where}: binary_data_size is {size} bytes, the shape needs {count} elements", where)
        array = np.frombuffer(binary[offset : offset + size], dtype=np.dtype(dtype).newbyteorder("<"))
        return array.astype(dtype, copy=False).reshape(shape), offset + size
    data = tensor.get("data")
    flat = _flatten(data, where)
    if len(flat) != count:
        raise bad_request(f"{where}: shape holds {count} elements, the data has {len(flat)}", where)
    kind = np.dtype(dtype).kind
    if kind == "b":
        ok = all(isinstance(x, bool) for x in flat)
    elif kind in "iu":
        info = np.iinfo(np.dtype(dtype))
        ok = all(isinstance(x, int) and not isinstance(x, bool) and info.min <= x <= info.max for x in flat)
    else:  # floats: NUMPY_TYPES offers no other kind
        limit = float(np.finfo(np.dtype(dtype)).max)
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) and abs(x) <= limit for x in flat)
    if not ok:
        raise bad_request(f"{where}: data does not fit datatype {tensor.get('datatype')}", where)
    return np.array(flat, dtype=dtype).reshape(shape), offset


def _flatten(data: Any, where: str) -> list[Any]:
    """KServe allows data flat or nested as the shape; either way, the scalars in order."""
    if not isinstance(data, list):
        raise bad_request(f"{where}: 'data' must be a list (or binary_data_size given)", where)
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:  # iterative: the decoder bounds the depth, this keeps order without recursion
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out
