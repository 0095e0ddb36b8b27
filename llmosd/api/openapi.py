"""The OpenAPI 3.1 description of every route, kept beside the routes it describes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmosd import __version__
from llmosd.api.requests import TIMEOUT_PATTERN
from llmosd.runtime.chat import RESERVED
from llmosd.runtime.sampling import OPEN_BELOW
from llmosd.runtime.tensors import NUMPY_TYPES
from llmosd.scheduler import DEFAULT_RANGES

_ERROR = {"$ref": "#/components/schemas/Error"}
# Not empty, nor only whitespace as Python's str.strip() counts it: that is also \x1c-\x1f and \x85,
# which a JSON Schema's (ECMAScript's) \S takes for text
NOT_BLANK = "[^\\s\\x1c-\\x1f\\x85]"
_TEXT = {"type": "string", "pattern": NOT_BLANK}
TEXTS = {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}]}
_CHOICES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1024}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
TRUNCATE = {"type": "boolean", "description": "cut an input over the model's limit there (default: refuse, 400)"}


_KSERVE_ERROR = {"$ref": "#/components/schemas/KServeError"}
_JSON = "application/json"
# Every status a route can answer besides its own: a LAN client without the token (401), and the
# per-address connection cap (429, answered before any route is chosen).
_COMMON = (401, 429)
_BODY = (400, 408, 413)  # a route that reads a JSON body: not JSON / invalid, too slow, too large
MODEL_ERRORS = (400, 404, 503)  # a route that names a model: invalid name, unknown, cannot be loaded now
_REASONS = {
    200: "OK",
    206: "Partial content (a Range request)",
    400: "The request is invalid: the message says which field and why",
    401: "A non-local client sent no valid bearer token",
    403: "Refused: the token lacks the scope the route needs, or by policy (an untrusted signature)",
    404: "No such model, version or file",
    408: "The request body did not arrive in time",
    409: "The request conflicts with the store's state",
    413: "The request body is larger than max_body_bytes",
    416: "The Range cannot be satisfied",
    422: "The model was fetched but its export or validation failed (the message says why)",
    429: "Busy: the model's queue is full, or this address holds too many connections (see Retry-After)",
    501: "This install cannot do it (pulling from Hugging Face needs llmosd[export])",
    502: "The registry failed",
    503: "Not ready, or the model is unavailable (loading failed, its worker is restarting)",
    504: "The request did not finish within its X-Request-Timeout",
    507: "Not enough disk space",
}
_TIMEOUT_HEADER = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": TIMEOUT_PATTERN},
    "description": "seconds in (0, 3600]; past it the request is dropped and answered 504",
}
_PRIORITY_HEADER = {
    "name": "X-Priority",
    "in": "header",
    "required": False,
    "schema": {"enum": ["high", "normal", "low"]},
}


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": _PARAM_SCHEMAS[n]} for n in names]


_VERSION = {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}
# Path parameters, as strict as the store's own checks (llmosd/store/names.py); /v1/models/{model} may
# name a model of the LAN or the cloud, so only its length is held.
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": "^(?!.*[.][.])[a-z0-9][a-z0-9._-]{0,63}$"},
    "model": {"type": "string", "minLength": 1},
    "version": _VERSION,
    "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
}


def operation(
    summary: str,
    ok: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (),
    *,
    ok_types: tuple[str, ...] = (_JSON,),
    kserve: bool = False,
    public: bool = False,
    extra: dict[int, dict[str, Any]] | None = None,
    headers: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """One operation: its 200 (a JSON schema, or other media types) and every error it can answer,
    each in the error shape of its family (KServe's string on /v2)."""
    ok_schema = ok or {"type": "object"}
    content = {t: {"schema": ok_schema if t == _JSON else _OTHER.get(t, {"type": "string"})} for t in ok_types}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for code, response in (extra or {}).items():
        responses[str(code)] = response
    statuses = set(errors) | {429} | (set() if public else {401, 403}) | (set(_BODY) if body else set())
    schema = _KSERVE_ERROR if kserve else _ERROR
    for code in sorted(statuses):
        responses[str(code)] = {"description": _REASONS[code], "content": {_JSON: {"schema": schema}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if headers:
        op["parameters"] = list(headers)
    if body:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    return op


def text_request(inputs: dict[str, Any] = TEXTS, **extra: dict[str, Any]) -> dict[str, Any]:
    """A body with ``model`` and ``input`` (one text or a list), plus route-specific fields."""
    properties = {"model": {"type": "string", "minLength": 1}, "input": inputs, "truncate": TRUNCATE, **extra}
    return {"type": "object", "required": ["model", "input"], "properties": properties}


_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
        ]
    },
    "stop_token_ids": {
        "type": "array",
        "maxItems": 1024,
        "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
    },
    "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 10},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "logit_bias": {
        "type": "object",
        "maxProperties": 1024,
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "ignore_eos": {"type": "boolean"},
    # Structured outputs: one of these constrains decoding (llguidance); a grammar that does not compile is a 400.
    "response_format": {
        "type": "object",
        "required": ["type"],
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"]},
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "schema": {"type": "object"},
                    "strict": {"type": "boolean"},
                },
            },
        },
    },
    "structured_outputs": {  # exactly one (a JSON schema sent as a JSON string is taken too)
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "json": {"type": "object"},
            "regex": {"type": "string"},
            "choice": _CHOICES,
            "grammar": {"type": "string", "description": "Lark or GBNF"},
            "json_object": {"const": True},
        },
    },
    "guided_json": {"oneOf": [{"type": "object"}, {"type": "string"}]},
    "guided_regex": {"type": "string"},
    "guided_choice": _CHOICES,
    "guided_grammar": {"type": "string"},
}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
_CONTENT = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            },
        },
    ]
}
_MESSAGE = {  # by role, as the server checks them: a tool answer names its call, an assistant may call
    "oneOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": _CONTENT},
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"const": "assistant"},
                "content": {"oneOf": [_CONTENT, {"type": "null"}]},
                "tool_calls": {"type": "array", "items": _TOOL_CALL},
                "function_call": {"type": "null"},  # the legacy field: refused
                "reasoning_content": {"type": ["string", "null"]},  # its thinking, passed back
                "reasoning": {"type": ["string", "null"]},
            },
        },
        {
            "type": "object",
            "required": ["role", "content", "tool_call_id"],
            "properties": {"role": {"const": "tool"}, "content": _CONTENT, "tool_call_id": {"type": "string"}},
        },
    ]
}
_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": "boolean"},
            },
        },
    },
}
_OIP = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"enum": sorted(NUMPY_TYPES)},
                    "data": {"type": "array"},
                    "parameters": {"type": "object"},
                },
                "anyOf": [{"required": ["data"]}, {"required": ["parameters"]}],  # parameters: binary data
            },
        },
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "parameters": {"type": "object"},
    },
}
# Before OpenAPI 3.2 (itemSchema), a text/event-stream's schema describes each event: its data here is an
# OpenAI chunk as JSON text, or [DONE]
_OTHER: dict[str, dict[str, Any]] = {
    "text/event-stream": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    }
}
_STREAM_NOTE = " With stream: true, text/event-stream of OpenAI chunks ending with data: [DONE]."

_OBJECT = {"type": "object"}
# A chat's template variables and thinking (llmosd.api.chat_options)
_THINKING: dict[str, Any] = {
    "chat_template_kwargs": {
        "type": ["object", "null"],
        "maxProperties": 64,
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "not": {"enum": sorted(RESERVED)}},
    },
    "documents": {"type": ["array", "null"], "items": {"type": "object"}},
    "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high", None]},
    "max_reasoning_tokens": {"type": ["integer", "null"], "minimum": 0},
    "include_reasoning": {"type": "boolean"},
    "add_generation_prompt": {"type": "boolean"},
    "continue_final_message": {"type": "boolean"},
}
_GEN_OK = {"type": "object", "required": ["id", "object", "choices", "usage"]}
GEN_HEADERS = (_TIMEOUT_HEADER, _PRIORITY_HEADER)
_OCTETS = "application/octet-stream"

# The text-generation task's routes (llmosd.api.completions), registered with that task.
GENERATION_PATHS: dict[str, dict[str, Any]] = {
    "/v1/completions": {
        "post": operation(
            "Complete a prompt (OpenAI shape)." + _STREAM_NOTE,
            ok=_GEN_OK,
            body={
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {
                    **_SAMPLING,
                    "prompt": {  # a string, token ids, or up to 16 of either
                        "oneOf": [
                            {"type": "string"},
                            IDS,
                            {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 16,
                                "items": {"oneOf": [{"type": "string"}, IDS]},
                            },
                        ]
                    },
                    "echo": {"type": "boolean"},
                    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
                    "max_tokens": {"type": ["integer", "null"], "minimum": 0},
                },
                # max_tokens 0 (score the prompt, generate nothing) only with echo
                "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
                "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
            },
            errors=(*MODEL_ERRORS, 504),
            ok_types=(_JSON, "text/event-stream"),
            headers=GEN_HEADERS,
        )
    },
    "/v1/chat/completions": {
        "post": operation(
            "Answer a chat with the model's own template (OpenAI shape)." + _STREAM_NOTE,
            ok=_GEN_OK,
            body={
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    **_SAMPLING,
                    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
                    "logprobs": {"type": ["boolean", "null"]},
                    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
                    "tools": {"type": "array", "items": _TOOL, "maxItems": 128},
                    "tool_choice": {
                        "oneOf": [
                            {"enum": ["none", "auto", "required"]},
                            {
                                "type": "object",
                                "required": ["type", "function"],
                                "properties": {
                                    "type": {"enum": ["function"]},
                                    "function": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1}},
                                    },
                                },
                            },
                        ]
                    },
                    "parallel_tool_calls": {"type": "boolean"},
                    **_THINKING,
                },
                # top_logprobs only with logprobs: true
                "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                # continuing the final message only without the generation prompt
                "allOf": [
                    {
                        "if": {
                            "required": ["continue_final_message"],
                            "properties": {"continue_final_message": {"const": True}},
                        },
                        "then": {
                            "required": ["add_generation_prompt"],
                            "properties": {"add_generation_prompt": {"const": False}},
                        },
                    }
                ],
            },
            errors=(*MODEL_ERRORS, 504),
            ok_types=(_JSON, "text/event-stream"),
            headers=GEN_HEADERS,
        )
    },
}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/models": {
        "get": {
            **operation(
                "List the served models (OpenAI shape); ?reachable=1 adds what the upstreams serve, with routes",
                ok={"type": "object", "required": ["object", "data"]},
            ),
            "parameters": [{"name": "reachable", "in": "query", "required": False, "schema": {"type": "string"}}],
        }
    },
    "/v1/models/{model}": {
        "get": operation("One served model", ok={"type": "object", "required": ["id", "object"]}, errors=MODEL_ERRORS)
    },
    "/v2": {"get": operation("Open Inference Protocol: server metadata", kserve=True)},
    "/v2/health/live": {"get": operation("OIP liveness", kserve=True)},
    "/v2/health/ready": {"get": operation("OIP readiness: the default models are loaded", errors=(503,), kserve=True)},
    "/v2/models/{name}": {
        "get": operation("OIP model metadata: tensor names, datatypes, shapes", errors=MODEL_ERRORS, kserve=True)
    },
    "/v2/models/{name}/versions/{version}": {
        "get": operation("OIP model metadata of one version", errors=MODEL_ERRORS, kserve=True)
    },
    "/v2/models/{name}/ready": {"get": operation("OIP model readiness", errors=MODEL_ERRORS, kserve=True)},
    "/v2/models/{name}/versions/{version}/ready": {
        "get": operation("OIP readiness of one version", errors=MODEL_ERRORS, kserve=True)
    },
    "/v2/models/{name}/infer": {
        "post": operation(
            "OIP inference on raw tensors (JSON or binary extension), batched",
            body=_OIP,
            errors=MODEL_ERRORS,
            ok_types=(_JSON, _OCTETS),
            kserve=True,
        )
    },
    "/v2/models/{name}/versions/{version}/infer": {
        "post": operation(
            "OIP inference on one version", body=_OIP, errors=MODEL_ERRORS, ok_types=(_JSON, _OCTETS), kserve=True
        )
    },
    "/api/models/{name}/tune": {"post": operation("Autotune the model's batch size now", errors=MODEL_ERRORS)},
    "/api/models/{name}/sampling": {
        "post": operation(
            "Set a causal LM's default sampling (null unsets a parameter); applied at once where it serves",
            body={
                "type": "object",
                "required": ["sampling"],
                "properties": {
                    "sampling": {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": False,
                        "properties": {
                            key: {"type": ["integer" if key in ("top_k", "max_tokens") else "number", "null"]}
                            | {"exclusiveMinimum" if key in OPEN_BELOW else "minimum": lo, "maximum": hi}
                            for key, (lo, hi) in DEFAULT_RANGES.items()
                        },
                    }
                },
            },
            errors=MODEL_ERRORS,
        )
    },
    "/healthz": {"get": operation("Liveness: the process answers", public=True)},
    "/metrics": {"get": operation("Prometheus metrics (text exposition format)", ok_types=("text/plain",))},
    "/api/hardware": {"get": operation("The hardware probe: CPU, GPUs, ORT providers that load, and placements")},
    "/readyz": {
        "get": operation("Readiness: default models loaded and warm, every worker up", errors=(503,), public=True)
    },
    "/api/status": {"get": operation("Daemon status: models, batcher statistics, listeners, memory")},
    "/api/models": {"get": operation("Models in the store, their versions and which is active")},
    "/api/models/{name}": {
        "get": {
            **operation("A model version's manifest (active unless ?version=)", errors=(400, 404)),
            "parameters": [{"name": "version", "in": "query", "required": False, "schema": _VERSION}],
        }
    },
    "/api/models/pull": {
        "post": operation(
            "Pull REGISTRY/REPO:TAG into the store (signature checked), or hf.co/ORG/REPO[@REV][:QUANT] from "
            "Hugging Face (downloaded, exported, validated); activate and serve it",
            body={
                "type": "object",
                "required": ["ref"],
                "properties": {
                    "ref": {"type": "string"},
                    "name": {"type": "string"},
                    "activate": {"type": "boolean"},
                    "task": {"type": ["string", "null"]},  # Hugging Face pulls: default from the checkpoint
                    "precision": {"enum": ["auto", "fp32", "fp16", "int8", "int4", None]},
                },
            },
            errors=(403, 404, 409, 422, 501, 502, 503, 507),
        )
    },
    "/api/blobs/{digest}": {
        "get": operation(
            "A verified store file, for LAN peers (Range supported)",
            errors=(400, 404, 416),
            ok_types=(_OCTETS,),
            extra={206: {"description": _REASONS[206], "content": {_OCTETS: {"schema": {"type": "string"}}}}},
        )
    },
    "/api/models/pulls": {"get": operation("Pulls running and recently finished, with bytes per layer")},
    "/api/models/{name}/activate": {
        "post": operation(
            "Activate a stored version; the old one drains (409: validated on other CPU kernels and refused here)",
            body={"type": "object", "required": ["version"], "properties": {"version": _VERSION}},
            errors=(*MODEL_ERRORS, 409),
        )
    },
    "/api/models/{name}/rollback": {
        "post": operation("Activate the newest version older than the active one", errors=(*MODEL_ERRORS, 409))
    },
    "/api/tasks": {"get": operation("The installed tasks, who registered each, and the plugins left out")},
    "/api/stats": {
        "get": operation("One sample of the console's figures, cumulative (counters, latency buckets, memory)")
    },
    "/": {
        "get": operation(
            "The console, for people (static; it reads /api/stats with a token)", ok_types=("text/html",), public=True
        )
    },
    "/console/{name}": {
        "get": operation(
            "The console's script, styles and chart library",
            errors=(404,),
            ok_types=("text/javascript", "text/css", "text/plain", "text/html"),
            public=True,
        )
    },
    "/openapi.json": {"get": operation("This document")},
}


def _with_params(paths: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every templated path declares its parameters."""
    out: dict[str, Any] = {}
    for path, ops in paths.items():
        out[path] = {m: dict(op) for m, op in ops.items()}
        for op in out[path].values():
            if params := _path_params(path):
                op["parameters"] = [*params, *op.get("parameters", [])]
    return out


def spec(tasks: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The document: the daemon's own routes and the installed tasks' (their ``paths``)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmosd", "version": __version__},
        "paths": _with_params({**PATHS, **(tasks or {})}),
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
                },
                "KServeError": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
