"""Typed /v1/completions and /v1/chat/completions requests, validated field by field (OpenAI's names,
plus vLLM's ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos`` and its
structured outputs: ``structured_outputs`` and the older ``guided_*`` fields)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from llmosd.api.chat_options import ChatOptions
from llmosd.api.errors import bad_request
from llmosd.api.tool_requests import ToolUse, tool_calls
from llmosd.config import Config
from llmosd.scheduler import (
    DEFAULT_RANGES,
    MAX_TOP_LOGPROBS,
    ROLES,
    GenerationOptions,
    GrammarSpec,
    Message,
    SamplingParams,
    json_schema,
)

MAX_N = 16
MAX_STOPS = 16
MAX_LOGIT_BIAS = 1024  # entries; OpenAI documents the map without a count, vLLM takes any
MAX_STOP_TOKEN_IDS = 1024  # vLLM takes any number; more than this many stop ids is no stop list
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar as sent; llguidance bounds the compiled size itself
MAX_CHOICES = 1024
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's json_schema.name


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(f"'{key}' must be a number", key)
    if not math.isfinite(value) or value < lo or value > hi or (open_lo and value == lo):
        left = "(" if open_lo else "["
        raise bad_request(f"'{key}' must be in {left}{lo}, {hi}]", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"'{key}' must be an integer {limit}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", key)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return tuple(stops)


def _token_ids(body: dict[str, Any], key: str) -> frozenset[int]:
    """Token ids: at most MAX_STOP_TOKEN_IDS, each under 2^31 (the vocabulary is checked where the model is
    known: scheduler/prepare.py)."""
    value = body.get(key)
    if value is None:
        return frozenset()
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_TOKEN_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in value)
    ):
        raise bad_request(f"'{key}' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids", key)
    return frozenset(value)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token ids (as JSON object keys, so strings) to a bias in [-100, 100]. Whether
    each id is in the model's vocabulary is checked where the model is known (api.completions)."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad_request(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids to biases", "logit_bias"
        )
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise bad_request("'logit_bias' keys must be token ids, such as \"50256\"", "logit_bias")
        if not isinstance(bias, int | float) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise bad_request(f"'logit_bias' values must be numbers in [-100, 100] (token {key})", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _refuse_unsupported(body: dict[str, Any], keys: dict[str, str]) -> None:
    for key, why in keys.items():
        if body.get(key) not in (None, False, [], {}, ""):
            raise bad_request(f"'{key}' is not supported: {why}", key)


def _sized(spec: GrammarSpec, param: str) -> GrammarSpec:
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"'{param}' is longer than {MAX_GRAMMAR_CHARS} characters", param)
    return spec


def _schema(value: Any, param: str) -> GrammarSpec:
    """A JSON schema as an object, or as a JSON string (vLLM's guided_json takes either)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(f"'{param}' is not valid JSON", param) from None
    if not isinstance(value, dict | bool):
        raise bad_request(f"'{param}' must be a JSON schema (an object)", param)
    return _sized(json_schema(value), param)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{param}' must be a non-empty string", param)
    return value


def _choices(value: Any, param: str) -> GrammarSpec:
    if not (isinstance(value, list) and 0 < len(value) <= MAX_CHOICES and all(isinstance(c, str) and c for c in value)):
        raise bad_request(f"'{param}' must be a list of 1 to {MAX_CHOICES} non-empty strings", param)
    return _sized(GrammarSpec("choice", json.dumps(value)), param)


def _response_format(value: Any) -> GrammarSpec | None:
    """OpenAI's ``response_format``: text, any JSON object, or JSON that matches a schema."""
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema({"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'", param)
        name, strict = spec.get("name"), spec.get("strict")
        if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
            raise bad_request("'response_format.json_schema.name' must be 1 to 64 of a-z, A-Z, 0-9, _ and -", param)
        if strict is not None and not isinstance(strict, bool):
            raise bad_request("'response_format.json_schema.strict' must be true or false", param)
        # Strict or not, decoding is constrained: the answer always follows the schema.
        return _schema(spec.get("schema", {}), "response_format.json_schema.schema")
    raise bad_request('\'response_format.type\' must be "text", "json_object" or "json_schema"', param)


def _structured(value: Any) -> GrammarSpec:
    """vLLM's ``structured_outputs``: one of json, regex, choice, grammar, json_object."""
    param = "structured_outputs"
    given = {k: v for k, v in value.items() if v not in (None, False)} if isinstance(value, dict) else None
    if given is None or len(given) != 1 or not set(given) <= {"json", "regex", "choice", "grammar", "json_object"}:
        raise bad_request(f"'{param}' must name one of json, regex, choice, grammar or json_object", param)
    (key, v), where = next(iter(given.items())), f"{param}.{next(iter(given))}"
    if key == "json":
        return _schema(v, where)
    if key == "json_object":
        return json_schema({"type": "object"})
    if key == "choice":
        return _choices(v, where)
    return _sized(GrammarSpec("regex" if key == "regex" else "grammar", _text(v, where)), where)


_CONSTRAINTS: dict[str, Callable[[Any, str], GrammarSpec | None]] = {
    "response_format": lambda v, _: _response_format(v),
    "structured_outputs": lambda v, _: _structured(v),
    "guided_json": _schema,
    "guided_regex": lambda v, p: _sized(GrammarSpec("regex", _text(v, p)), p),
    "guided_choice": _choices,
    "guided_grammar": lambda v, p: _sized(GrammarSpec("grammar", _text(v, p)), p),
}


def _grammar(body: dict[str, Any]) -> tuple[GrammarSpec | None, str]:
    """The one constraint a request may set on its output, and the field that set it."""
    found = [
        (spec, key)
        for key, parse in _CONSTRAINTS.items()
        if body.get(key) is not None and (spec := parse(body[key], key)) is not None
    ]
    if len(found) > 1:
        names = " and ".join(f"'{p}'" for _, p in found)
        raise bad_request(f"{names} both constrain the output: send one", found[1][1])
    return found[0] if found else (None, "response_format")


@dataclass(frozen=True)
class Sampling:
    """What both endpoints share."""

    model: str
    params: SamplingParams
    max_tokens: int | None  # None: the config's default, within the context
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    given: frozenset[str] = frozenset()  # the sampling fields the request set (the rest: the model's defaults)
    logprobs: int | None = None  # None: not asked; n: each token's log-probability and the n likeliest
    prompt_logprobs: bool = False  # the prompt's tokens' too (completions' echo)
    grammar: GrammarSpec | None = None  # the output must follow it
    grammar_param: str = "response_format"

    def options(self, priority: int, limits: Config) -> GenerationOptions:
        return GenerationOptions(
            params=self.params,
            given=self.given,
            max_tokens=self.max_tokens,
            default_max_tokens=limits.default_max_tokens,
            n=self.n,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            priority=priority,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            grammar=self.grammar,
            grammar_param=self.grammar_param,
        )

    @classmethod
    def parse(cls, body: dict[str, Any], max_tokens_key: str = "max_tokens", least_tokens: int = 1) -> Sampling:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string", "model")
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not stream):
            raise bad_request("'stream_options' must be an object, and only with 'stream': true", "stream_options")
        include_usage = bool(options and options.get("include_usage"))
        seed = _integer(body, "seed", -(2**63), 2**64 - 1)
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
            top_k=max(_integer(body, "top_k", -1) or 0, 0),  # vLLM: -1 means off
            repetition_penalty=_number(body, "repetition_penalty", 1.0, *DEFAULT_RANGES["repetition_penalty"]),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            logit_bias=_logit_bias(body),
            seed=None if seed is None else seed % 2**64,
        )
        max_tokens = _integer(body, max_tokens_key, least_tokens)
        grammar, grammar_param = _grammar(body)
        return cls(
            model=model,
            params=params,
            max_tokens=max_tokens,
            n=_integer(body, "n", 1, MAX_N) or 1,
            stream=stream,
            include_usage=include_usage,
            stop=_stops(body),
            stop_token_ids=_token_ids(body, "stop_token_ids"),
            ignore_eos=_flag(body, "ignore_eos"),
            given=frozenset(k for k in DEFAULT_RANGES if body.get(k) is not None),
            grammar=grammar,
            grammar_param=grammar_param,
        )


@dataclass(frozen=True)
class CompletionRequest:
    sampling: Sampling
    prompts: list[str | list[int]]  # text, or token ids as sent
    echo: bool

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> CompletionRequest:
        _refuse_unsupported(body, {"suffix": "no fill-in-the-middle model is served"})
        best_of = _integer(body, "best_of", 1)
        if best_of not in (None, 1) and best_of != body.get("n", 1):
            raise bad_request("'best_of' other than 'n' is not supported", "best_of")
        logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        echo = _flag(body, "echo")
        # max_tokens 0 with echo: the prompt back, and its log-probabilities (lm-evaluation-harness's loglikelihood)
        sampling = Sampling.parse(body, least_tokens=0 if echo else 1)
        sampling = replace(sampling, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
        return cls(sampling, _prompts(body.get("prompt"), limits), echo)


def _prompts(value: Any, limits: Config) -> list[str | list[int]]:
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif is_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) or is_ids(x) for x in value):
        prompts = list(value)
    elif value is None:
        raise bad_request("'prompt' is required: a string, a list of strings, or token ids", "prompt")
    else:
        raise bad_request("'prompt' must be a string, a list of strings, or a list of token ids", "prompt")
    if len(prompts) > MAX_N:
        raise bad_request(f"at most {MAX_N} prompts per request", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str) and len(p) > limits.max_input_chars:
            raise bad_request(f"prompt {i} is longer than {limits.max_input_chars} characters", "prompt")
    return prompts


@dataclass(frozen=True)
class ChatRequest:
    sampling: Sampling
    messages: list[Message]
    tools: ToolUse = field(default_factory=ToolUse)
    chat: ChatOptions = field(default_factory=ChatOptions)

    def options(self, priority: int, limits: Config) -> GenerationOptions:
        c = self.chat
        return replace(
            self.sampling.options(priority, limits),
            template_vars=c.template_vars,
            turn=c.turn,
            thinking=c.thinking,
            max_reasoning_tokens=c.max_reasoning_tokens,
        )

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> ChatRequest:
        _refuse_unsupported(
            body,
            {
                "functions": "the legacy 'functions' are not supported: send 'tools'",
                "function_call": "the legacy 'function_call' is not supported: send 'tool_choice'",
                "audio": "audio output is not supported",
            },
        )
        tools = ToolUse.parse(body)
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        wanted = _flag(body, "logprobs")
        if top is not None and not wanted:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        sampling = replace(Sampling.parse(body, max_key), logprobs=(top or 0) if wanted else None)
        forced = tools.grammar()
        if forced is not None:
            if sampling.grammar is not None:
                raise bad_request(
                    f"'tool_choice' {tools.choice!r} and '{sampling.grammar_param}' both constrain the output",
                    "tool_choice",
                )
            sampling = replace(sampling, grammar=forced, grammar_param="tool_choice")
        return cls(sampling, _messages(body.get("messages"), limits), tools, ChatOptions.parse(body))


def _messages(value: Any, limits: Config) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    total = 0
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported: use one of {', '.join(ROLES)}", f"{where}.role")
        if m.get("function_call"):
            raise bad_request(f"{where}: the legacy 'function_call' is not supported: send 'tool_calls'", where)
        calls = tool_calls(m.get("tool_calls"), where) if role == "assistant" else ()
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise bad_request(f"{where}: a tool message needs the 'tool_call_id' it answers", where)
        content = _content(m.get("content"), f"{where}.content", role)
        thought = _thought(m, where) if role == "assistant" else None
        total += len(content) + sum(len(c.arguments) for c in calls) + len(thought or "")
        out.append(
            Message(
                "system" if role == "developer" else role, content, calls, call_id if role == "tool" else None, thought
            )
        )
    if total > limits.max_input_chars:
        raise bad_request(f"the messages are longer than {limits.max_input_chars} characters", "messages")
    return out


def _thought(m: dict[str, Any], where: str) -> str | None:
    """An assistant's thinking passed back (vLLM's ``reasoning_content``, or ``reasoning``)."""
    value = m.get("reasoning_content", m.get("reasoning"))
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
    return value


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where} must be a string or a list of text parts", where)
