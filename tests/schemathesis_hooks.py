"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS): most generated
cases name a model the daemon really serves, of the task the route serves (a random name only tests the
404), and generation stays bounded (max_tokens at most 8, at most 4 tools), so a thousand cases fit in
CI's minutes.

The run checks that data valid under the OpenAPI document is accepted. What the document cannot state —
which model does which task, that a named tool_choice names one of the tools, that stream_options comes
with stream — the hooks make true of each case, as a client that read the API's prose would."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import schemathesis

# "name:task,…": the models the daemon serves and their tasks
SERVED = dict(m.split(":", 1) for m in os.environ.get("LLMOSD_FUZZ_MODELS", "").split(",") if ":" in m)
MAX_TOKENS = 8
MAX_TOOLS = 4
VOCABULARY = 30_000  # under MiniLM's 30,522 and SmolLM2's 49,152
ROUTE_TASKS = {  # the task a route's model must have; routes not named here take any model
    "/v1/completions": "text-generation",
    "/v1/chat/completions": "text-generation",
    "/api/models/{name}/sampling": "text-generation",
    "/v1/embeddings": "feature-extraction",
    "/v1/classify": "text-classification",
    "/v1/rerank": "text-ranking",
    "/rerank": "text-ranking",
}


def _pick(seed: str, current: Any, task: str | None) -> Any:
    """A real model of ``task`` for 3 cases in 4, chosen by the case's own content (reproducible); the
    case's own name where the daemon serves none of that task (a 404)."""
    models = [name for name, t in SERVED.items() if task is None or t == task]
    if not models:
        return current
    k = int(hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest(), 16) % (len(models) * 4 // 3 + 1)
    return models[k] if k < len(models) else current


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    task = ROUTE_TASKS.get(case.operation.path)
    params = case.path_parameters or {}
    for key in ("name", "model"):
        if key in params:
            params[key] = _pick(repr(sorted(params.items())), params[key], task)
    if params.get("version") is not None and _pick(repr(params), None, None) is not None:
        params["version"] = "1"  # the version the store holds, most of the time
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = _pick(repr(sorted(body, key=str)) + str(len(str(body))), body["model"], task)
        if task == "text-generation" and ("messages" in body or "prompt" in body):
            # bounded even where a case names none: the store may hold a model default of thousands
            body.setdefault("max_tokens", MAX_TOKENS)
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[key] = MAX_TOKENS  # 1e30 is an integer to JSON Schema, and to the daemon
        if isinstance(body.get("prompt"), list) and body["prompt"] and not isinstance(body["prompt"][0], int):
            del body["prompt"][2:]  # at most two prompts (each one more sequence to generate)
        if isinstance(body.get("tools"), list):
            del body["tools"][MAX_TOOLS:]  # each tool lengthens the prompt: 128 made one case a 10 s prefill
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 2:
            body["n"] = 2
        if body.get("stream") is not True:
            body.pop("stream_options", None)  # OpenAI's rule: only with stream
        body.pop("dimensions", None)  # no model here was exported as Matryoshka-trained: any cut is a 400
        body.pop("prompt_name", None)  # nor has sentence-transformers prompts: any name is a 400
        for key in ("input", "prompt", "stop_token_ids"):  # token ids within every served vocabulary
            if key in body:
                body[key] = _in_vocabulary(body[key])
        if isinstance(body.get("logit_bias"), dict):
            bias = body["logit_bias"].items()
            body["logit_bias"] = {str(int(k) % VOCABULARY): v for k, v in bias if k.isascii() and k.isdigit()}
        _consistent_tools(body)
        _compilable(body)
        _one_constraint(body)
    headers = case.headers or {}
    if "X-Request-Timeout" in headers:
        headers["X-Request-Timeout"] = "120"  # a valid 1 s deadline is a 504 when generation takes longer
    return case


CONSTRAINTS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def _one_constraint(body: dict[str, Any]) -> None:
    """One constraint on the output: the first present (none where a tool_choice forces calls)."""
    forced = body.get("tool_choice") not in (None, "none", "auto") and body.get("tools")
    kept = forced
    for key in CONSTRAINTS:
        value = body.get(key)
        text = key == "response_format" and isinstance(value, dict) and value.get("type") == "text"
        if value is None or text:
            continue
        if kept:
            body.pop(key)
        kept = True


def _in_vocabulary(value: Any) -> Any:
    """Token ids (a list, or lists of them) brought under the smallest served vocabulary (3e16 is an
    integer to JSON Schema, and to the daemon)."""
    if isinstance(value, list):
        return [_in_vocabulary(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value) % VOCABULARY
    return value


# What the schema can only call a string or an object: a grammar engine's input that compiles
VALID_GRAMMARS = {"regex": "[a-z]{1,8}", "grammar": 'start: "yes" | "no"', "json": {"type": "object"}}


def _compilable(body: dict[str, Any]) -> None:
    outputs = body.get("structured_outputs")
    if isinstance(outputs, dict):
        for key, example in VALID_GRAMMARS.items():
            if key in outputs:
                outputs[key] = example
    for key, example in (("guided_regex", "[a-z]{1,8}"), ("guided_grammar", 'start: "yes"'), ("guided_json", {})):
        if key in body:
            body[key] = example
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        fmt["json_schema"]["schema"] = {"type": "object"}


def _consistent_tools(body: dict[str, Any]) -> None:
    """A named tool_choice names one of the tools; with no tools there is no tool_choice."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        for call in (message.get("tool_calls") or ()) if isinstance(message, dict) else ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call["function"]["arguments"] = "{}"  # JSON text, which a schema cannot say
    seen: set[str] = set()
    for i, t in enumerate(tools if isinstance(tools, list) else ()):  # unique names, compilable parameters
        function = t.get("function") if isinstance(t, dict) else None
        if not isinstance(function, dict):
            continue
        name = function.get("name")
        if isinstance(name, str) and name in seen:
            function["name"] = name = f"tool_{i}_{len(seen)}"
        if isinstance(name, str):
            seen.add(name)
        if "parameters" in function:
            function["parameters"] = {"type": "object", "properties": {}}
    if choice is None:
        return
    functions = [
        t["function"]
        for t in (tools if isinstance(tools, list) else ())
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    names = [f["name"] for f in functions if isinstance(f.get("name"), str)]
    if not names:
        body.pop("tool_choice")
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        choice["function"]["name"] = names[0]
