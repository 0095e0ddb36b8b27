"""Preparing a generation request for one model, below the API: the chat template, tokenisation, the
context and vocabulary checks, the default ``max_tokens`` and the grammar. The API hands over what the
client asked (model-independent, already validated); what comes back is ready to submit, or an
``InvalidRequest`` naming the field at fault. Blocking (templates, tokenisers, grammar compilation): the
engine runs it off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from llmosd.runtime.chat import OPEN, ChatTemplateError, Message
from llmosd.runtime.generator import TextGenerator
from llmosd.runtime.grammar import Constraint, GrammarError, GrammarSpec
from llmosd.runtime.reasoning import ThinkingPlan
from llmosd.runtime.sampling import SamplingParams, with_defaults
from llmosd.runtime.tools import Tool
from llmosd.scheduler.generation import GenerationEngine, GenerationRequest, GenerationStream, RequestTooLarge
from llmosd.scheduler.priority import NORMAL


class InvalidRequest(ValueError):
    """The request cannot run on this model; ``param`` names the field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationOptions:
    """What a client asked of a generation, whatever the model."""

    params: SamplingParams = field(default_factory=SamplingParams)
    given: frozenset[str] = frozenset()  # the sampling fields the request set (the rest: the model's defaults)
    max_tokens: int | None = None  # None: the model's default, else ``default_max_tokens``, within the context
    default_max_tokens: int = 1024
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = NORMAL
    logprobs: int | None = None  # None: not asked; n: each token's log-probability and the n likeliest
    prompt_logprobs: bool = False  # the prompt's tokens' too (completions' echo)
    grammar: GrammarSpec | None = None  # the output must follow it (structured outputs)
    grammar_param: str = "response_format"  # the field that asked for it, for a 400
    # Chats only: the template's own variables (vLLM's chat_template_kwargs), whether a model that thinks
    # may (None: as its template says; False: off), and the thinking's budget in tokens (None: max_tokens').
    template_vars: Mapping[str, Any] = field(default_factory=dict)
    turn: str = OPEN  # how the rendered chat ends: the assistant's turn opened, closed, or its final message continued
    thinking: bool | None = None
    max_reasoning_tokens: int | None = None


@dataclass(frozen=True)
class Prepared:
    """Requests ready to submit: ``n`` per prompt (choice index = prompt * n + i), each with its own grammar
    matcher where the output is constrained."""

    prompts: list[list[int]]
    requests: list[GenerationRequest]
    constraints: list[Constraint | None]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


async def prepare_completion(
    engine: GenerationEngine, options: GenerationOptions, prompts: Sequence[str | list[int]]
) -> Prepared:
    return await asyncio.to_thread(_prepare, engine.model, options, lambda: encode_prompts(engine.model, prompts))


async def prepare_chat(
    engine: GenerationEngine, options: GenerationOptions, messages: list[Message], tools: list[Tool] | None = None
) -> Prepared:
    """A chat, rendered with the model's template (``tools`` through it, or through the generic prompt)."""
    render = lambda: [render_chat(engine.model, messages, tools, options)]  # noqa: E731
    return await asyncio.to_thread(_prepare, engine.model, options, render, True)


def start(engine: GenerationEngine, prepared: Prepared) -> list[GenerationStream]:
    """Submit every sequence, all or none (on the loop)."""
    streams: list[GenerationStream] = []
    try:
        for request, constraint in zip(prepared.requests, prepared.constraints, strict=True):
            streams.append(engine.submit(request, constraint))
    except RequestTooLarge as exc:
        for stream in streams:
            stream.cancel()
        raise InvalidRequest(str(exc), "max_tokens") from None
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def _prepare(
    model: TextGenerator, options: GenerationOptions, encode: Callable[[], list[list[int]]], chat: bool = False
) -> Prepared:
    check(model, options)
    prompts = encode()
    requests = []
    for ids in prompts:
        plan = thinking_plan(model, options, ids) if chat else None
        for i in range(options.n):
            requests.append(
                GenerationRequest(
                    tuple(ids),
                    sequence_params(model, options, i),
                    max_tokens(model, options, ids),
                    options.stop,
                    options.stop_token_ids,
                    options.ignore_eos,
                    options.priority,
                    options.logprobs,
                    options.prompt_logprobs,
                    plan,
                )
            )
    return Prepared(prompts, requests, constraints(model, options, len(requests)))


def encode_prompts(model: TextGenerator, prompts: Sequence[str | list[int]]) -> list[list[int]]:
    """Raw completions' prompts: text (with the tokenizer's own decoration) or token ids, checked."""
    out = []
    for i, p in enumerate(prompts):
        ids = model.encode(p, special=True) if isinstance(p, str) else list(p)
        if any(t < 0 or t >= model.lm.vocab_size for t in ids):
            raise InvalidRequest(f"prompt {i} holds token ids outside the vocabulary", "prompt")
        out.append(ids)
    return out


def render_chat(
    model: TextGenerator, messages: list[Message], tools: list[Tool] | None, options: GenerationOptions
) -> list[int]:
    """The chat's prompt. With thinking turned off on a model that thinks, its template's toggle is set,
    and a block the template still opens is closed right away (R1-style templates have no toggle)."""
    variables = dict(options.template_vars)
    fmt = model.reasoning if options.thinking is False else None  # thinking turned off on a model that thinks
    if fmt is not None and fmt.toggle is not None:
        variables[fmt.toggle] = False  # harmony has none
    try:
        ids = model.render_chat(messages, tools, variables, options.turn)
    except ChatTemplateError as exc:
        raise InvalidRequest(str(exc), "messages") from None
    except ValueError as exc:  # no chat template
        raise InvalidRequest(str(exc), "model") from None
    if fmt is not None:  # what the template left open, closed (think tags), or the answer's channel opened (harmony)
        ids += fmt.turned_off(ids, lambda text: model.encode(text, special=False))
    return ids


def thinking_plan(model: TextGenerator, options: GenerationOptions, prompt: list[int]) -> ThinkingPlan | None:
    """How a chat's answer is split into thinking and answer (None: it is all answer)."""
    fmt = model.reasoning
    if fmt is None or options.thinking is False:
        return None
    return fmt.plan(prompt, options.max_reasoning_tokens)


def check(model: TextGenerator, options: GenerationOptions) -> None:
    vocab = model.lm.vocab_size
    if any(t >= vocab for t, _ in options.params.logit_bias):
        raise InvalidRequest(f"'logit_bias' names token ids outside the vocabulary (it has {vocab})", "logit_bias")
    if any(t >= vocab for t in options.stop_token_ids):
        raise InvalidRequest(
            f"'stop_token_ids' names token ids outside the vocabulary (it has {vocab})", "stop_token_ids"
        )


def constraints(model: TextGenerator, options: GenerationOptions, count: int) -> list[Constraint | None]:
    """A matcher per sequence (compiled once, by digest, then copied), or none."""
    if options.grammar is None:
        return [None] * count
    try:
        first = model.grammars.compile(options.grammar)  # checked once (its first mask), then copied
        return [first, *(first.copy() for _ in range(count - 1))]
    except GrammarError as exc:
        raise InvalidRequest(f"the grammar cannot be compiled: {exc}", options.grammar_param) from None


def sequence_params(model: TextGenerator, options: GenerationOptions, i: int) -> SamplingParams:
    params = with_defaults(options.params, options.given, model.sampling_defaults)
    banned = model.reasoning.banned_when_off() if model.reasoning is not None and options.thinking is False else ()
    if banned:  # thinking off: the tag that opens it is never sampled
        bias = dict(params.logit_bias) | dict.fromkeys(banned, -100.0)
        params = replace(params, logit_bias=tuple(sorted(bias.items())))
    if params.seed is not None and i:  # n choices from one seed must differ, reproducibly
        params = replace(params, seed=(params.seed + i) % 2**64)
    return params


def max_tokens(model: TextGenerator, options: GenerationOptions, prompt: list[int]) -> int:
    if options.max_tokens == 0:  # echo only: the prompt scored, nothing generated
        return 0
    if options.max_tokens is not None:
        return options.max_tokens
    fallback = int(model.sampling_defaults.get("max_tokens", options.default_max_tokens))
    return max(min(fallback, model.context_length - len(prompt)), 1)
