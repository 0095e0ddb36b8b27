"""Rendering a model's own chat template (jinja2, sandboxed, the way transformers renders it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmosd.runtime.tools import Tool, ToolCall, generic_prompt, written

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with this model's template (the message says why)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def as_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
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


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
            # Whether the template renders tools itself (it reads a ``tools`` variable).
            self.takes_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as exc:
            raise ValueError(f"the model's chat template does not compile: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[Message], tools: list[Tool] | None = None) -> str:
        """The prompt for these messages, ending with the assistant's turn opened; ``tools`` through the
        template where it takes them, else through the generic prompt."""
        if not self.takes_tools and (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
            messages, tools = generic_tools(messages, tools or []), None
        try:
            return self._template.render(
                messages=[m.as_template() for m in messages],
                add_generation_prompt=True,
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
