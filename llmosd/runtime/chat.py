"""Rendering a model's own chat template (jinja2, sandboxed, the way transformers renders it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmosd.runtime.tools import Tool, ToolCall, generic_prompt, written

ROLES = ("system", "developer", "user", "assistant", "tool")
OPEN, CLOSED, CONTINUE = "open", "closed", "continue"  # how a rendered chat ends (ChatTemplate.render)
# The variables and functions llmosd gives every template; a request's own variables may not replace them.
RESERVED = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now"}
    | {"range", "dict", "lipsum", "cycler", "joiner", "namespace"}  # jinja2's own globals
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with this model's template (the message says why)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    reasoning_content: str | None = None  # an assistant's thinking, passed back (templates drop or keep it)

    def as_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.as_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def generic_tools(messages: list[Message], tools: list[Tool]) -> list[Message]:
    """The conversation for a template that knows nothing of tools: the tools in the system prompt,
    earlier calls written in the assistant's turns, tools' answers as the user's turn in
    ``<tool_response>`` tags (Qwen's and Ollama's convention)."""
    out: list[Message] = []
    prompt = generic_prompt(tools) if tools else ""
    if prompt and messages and messages[0].role == "system":
        out.append(Message("system", f"{messages[0].content}\n\n{prompt}"))
        messages = messages[1:]
    elif prompt:
        out.append(Message("system", prompt))
    for m in messages:
        if m.role == "tool":
            answer = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = Message("user", f"{out[-1].content}\n{answer}")
            else:
                out.append(Message("user", answer))
        elif m.tool_calls:
            out.append(Message(m.role, (m.content + "\n" if m.content else "") + written(m.tool_calls)))
        else:
            out.append(m)
    return out


class _Generation(Extension):
    """``{% generation %}`` ... ``{% endgeneration %}``: transformers marks the assistant's tokens with it
    (for training masks; SmolLM3's and other templates carry it). Rendering a prompt, the block is its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _cut_after(text: str, final: str) -> str:
    """The rendered chat up to the end of its final message (as transformers cuts it: some templates strip
    a message, so the stripped text is looked for next)."""
    if not final:  # nothing to find: the whole render, as transformers' rindex("") leaves it
        return text
    for wanted in (final, final.strip()):
        at = text.rfind(wanted) if wanted else -1
        if at >= 0:
            return text[: at + len(wanted)]
    raise ChatTemplateError("continue_final_message: the final message's text does not appear in the rendered chat")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
            # The variables it reads (``tools``, ``enable_thinking``, ``documents`` ...).
            self.variables = frozenset(meta.find_undeclared_variables(env.parse(source)))
            self.takes_tools = "tools" in self.variables  # it renders tools itself
        except jinja2.TemplateError as exc:
            raise ValueError(f"the model's chat template does not compile: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[Message],
        tools: list[Tool] | None = None,
        variables: Mapping[str, Any] | None = None,
        turn: str = OPEN,
    ) -> str:
        """The prompt for these messages; ``tools`` through the template where it takes them, else through
        the generic prompt; ``variables``: more of the template's own (``enable_thinking``,
        ``reasoning_effort``, ``documents``: vLLM's ``chat_template_kwargs``). ``turn``: ``open`` ends with
        the assistant's turn opened (add_generation_prompt), ``closed`` does not, ``continue`` ends inside
        the final message, which the answer continues (vLLM's and transformers' continue_final_message)."""
        final = messages[-1].content if messages else ""
        if not self.takes_tools and (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
            messages, tools = generic_tools(messages, tools or []), None
        text = self._render(messages, tools, variables, turn == OPEN)
        return _cut_after(text, final) if turn == CONTINUE else text

    def _render(
        self, messages: list[Message], tools: list[Tool] | None, variables: Mapping[str, Any] | None, opened: bool
    ) -> str:
        try:
            return self._template.render(
                **(variables or {}),
                messages=[m.as_template() for m in messages],
                add_generation_prompt=opened,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=[t.as_openai() for t in tools] if tools else None,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template rejected these messages: {exc}") from exc
        except (TypeError, KeyError, ValueError) as exc:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {exc}") from exc
