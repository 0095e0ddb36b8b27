"""The OpenAPI 3.1 description of every route, kept beside the routes it describes."""

from __future__ import annotations

from typing import Any

from llmosd import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_TEXTS = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    ]
}


def _op(
    summary: str, ok: dict[str, Any] | None = None, body: dict[str, Any] | None = None, errors: tuple[int, ...] = ()
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": ok or {"type": "object"}}}}
    }
    for code in (400, 401, 413, 429, 503, *errors) if body else (401, *errors):
        responses[str(code)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _text_request(**extra: dict[str, Any]) -> dict[str, Any]:
    """A body with ``model`` and ``input`` (one text or a list), plus route-specific fields."""
    properties = {"model": {"type": "string"}, "input": _TEXTS, **extra}
    return {"type": "object", "required": ["model", "input"], "properties": properties}


_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "seed": {"type": "integer"},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "ignore_eos": {"type": "boolean"},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
}
_OIP = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "parameters": {"type": "object"},
    },
}
_STREAM_NOTE = " With stream: true, text/event-stream of OpenAI chunks ending with data: [DONE]."

PATHS: dict[str, dict[str, Any]] = {
    "/v1/completions": {
        "post": _op(
            "Complete a prompt (OpenAI shape)." + _STREAM_NOTE,
            ok={"type": "object", "required": ["id", "object", "choices", "usage"]},
            body={
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {**_SAMPLING, "prompt": {}, "echo": {"type": "boolean"}},
            },
            errors=(404,),
        )
    },
    "/v1/chat/completions": {
        "post": _op(
            "Answer a chat with the model's own template (OpenAI shape)." + _STREAM_NOTE,
            ok={"type": "object", "required": ["id", "object", "choices", "usage"]},
            body={
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    **_SAMPLING,
                    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
                },
            },
            errors=(404,),
        )
    },
    "/v1/models": {"get": _op("List the served models (OpenAI shape)")},
    "/v1/models/{model}": {"get": _op("One served model", errors=(404,))},
    "/v1/embeddings": {
        "post": _op(
            "Embed text (OpenAI shape)",
            ok={"type": "object", "required": ["object", "data", "model", "usage"]},
            body=_text_request(
                encoding_format={"enum": ["float", "base64"]},
                dimensions={"type": "integer"},
                user={"type": "string"},
            ),
            errors=(404,),
        )
    },
    "/v1/classify": {
        "post": _op(
            "Classify text: labels and scores",
            body=_text_request(top_k={"type": "integer", "minimum": 1}),
            errors=(404,),
        )
    },
    "/v2": {"get": _op("Open Inference Protocol: server metadata")},
    "/v2/health/live": {"get": _op("OIP liveness")},
    "/v2/health/ready": {"get": _op("OIP readiness: the default models are loaded", errors=(503,))},
    "/v2/models/{name}": {"get": _op("OIP model metadata: tensor names, datatypes, shapes", errors=(404,))},
    "/v2/models/{name}/versions/{version}": {"get": _op("OIP model metadata of one version", errors=(404,))},
    "/v2/models/{name}/ready": {"get": _op("OIP model readiness", errors=(404,))},
    "/v2/models/{name}/versions/{version}/ready": {"get": _op("OIP readiness of one version", errors=(404,))},
    "/v2/models/{name}/infer": {
        "post": _op("OIP inference on raw tensors (JSON or binary extension), batched", body=_OIP, errors=(404,))
    },
    "/v2/models/{name}/versions/{version}/infer": {
        "post": _op("OIP inference on one version", body=_OIP, errors=(404,))
    },
    "/api/models/{name}/tune": {"post": _op("Autotune the model's batch size now (encoders)", errors=(400, 404))},
    "/healthz": {"get": _op("Liveness: the process answers")},
    "/metrics": {"get": _op("Prometheus metrics (text format)")},
    "/api/hardware": {"get": _op("The hardware probe: CPU, GPUs, ORT providers that load, and placements")},
    "/readyz": {"get": _op("Readiness: default models loaded and warm", errors=(503,))},
    "/api/status": {"get": _op("Daemon status: models, batcher statistics, listeners, memory")},
    "/api/models": {"get": _op("Models in the store, their versions and which is active")},
    "/api/models/{name}": {"get": _op("A model version's manifest (active unless ?version=)", errors=(404,))},
    "/api/models/pull": {
        "post": _op(
            "Pull REGISTRY/REPO:TAG into the store (signature checked), activate and serve it",
            body={
                "type": "object",
                "required": ["ref"],
                "properties": {"ref": {"type": "string"}, "name": {"type": "string"}, "activate": {"type": "boolean"}},
            },
            errors=(403, 502, 507),
        )
    },
    "/api/blobs/{digest}": {"get": _op("A verified store file, for LAN peers (Range supported)", errors=(400, 404))},
    "/api/models/pulls": {"get": _op("Pulls running and recently finished, with bytes per layer")},
    "/api/models/{name}/activate": {
        "post": _op(
            "Activate a stored version; the old one drains",
            body={"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
            errors=(404,),
        )
    },
    "/api/models/{name}/rollback": {
        "post": _op("Activate the newest version older than the active one", errors=(404, 409))
    },
    "/openapi.json": {"get": _op("This document")},
}


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmosd", "version": __version__},
        "paths": PATHS,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["type", "message"],
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                                "param": {"type": "string"},
                            },
                        }
                    },
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
