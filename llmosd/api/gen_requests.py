"""Typed /v1/completions and /v1/chat/completions requests, validated field by field (OpenAI's names,
plus vLLM's ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids`` and ``ignore_eos``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from llmosd.api.errors import bad_request
from llmosd.config import Config
from llmosd.runtime.chat import ROLES, Message
from llmosd.runtime.sampling import DEFAULT_RANGES, MAX_TOP_LOGPROBS, SamplingParams, with_defaults

MAX_N = 16
MAX_STOPS = 16
MAX_LOGIT_BIAS = 1024  # entries; OpenAI documents the map without a count, vLLM takes any


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
    value = body.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise bad_request(f"'{key}' must be a list of token ids", key)
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

    def params_for(self, defaults: dict[str, float | int]) -> SamplingParams:
        return with_defaults(self.params, self.given, defaults)

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
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, open_lo=True),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            logit_bias=_logit_bias(body),
            seed=None if seed is None else seed % 2**64,
        )
        max_tokens = _integer(body, max_tokens_key, least_tokens)
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

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> ChatRequest:
        _refuse_unsupported(
            body,
            {
                "tools": "tool calling is not supported",
                "functions": "function calling is not supported",
                "audio": "audio output is not supported",
            },
        )
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad_request('\'response_format\' supports only {"type": "text"}', "response_format")
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        wanted = _flag(body, "logprobs")
        if top is not None and not wanted:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        sampling = replace(Sampling.parse(body, max_key), logprobs=(top or 0) if wanted else None)
        return cls(sampling, _messages(body.get("messages"), limits))


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
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request(f"{where}: tool calls are not supported", where)
        content = _content(m.get("content"), f"{where}.content", role)
        total += len(content)
        out.append(Message("system" if role == "developer" else role, content))
    if total > limits.max_input_chars:
        raise bad_request(f"the messages are longer than {limits.max_input_chars} characters", "messages")
    return out


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
