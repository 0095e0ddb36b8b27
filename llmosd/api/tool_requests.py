"""A chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, and the calls earlier
assistant messages made, validated as OpenAI documents them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llmosd.api.errors import bad_request
from llmosd.scheduler import GrammarSpec, Tool, ToolCall, tool_grammar

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolUse:
    tools: tuple[Tool, ...] = ()
    choice: str = "none"  # none, auto, required, or function (the one named)
    named: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> list[Tool]:
        """The tools the prompt shows: none where the model may not call them."""
        return [] if self.choice == "none" else list(self.tools)

    @property
    def names(self) -> frozenset[str]:
        """The functions whose calls are read back from the answer."""
        if self.choice == "function" and self.named:
            return frozenset({self.named})
        return frozenset(t.name for t in self.offered)

    def grammar(self) -> GrammarSpec | None:
        """``required`` and a named function are enforced: the answer is only calls, valid ones."""
        if self.choice == "required":
            return tool_grammar(list(self.tools), self.parallel)
        if self.choice == "function":
            return tool_grammar([t for t in self.tools if t.name == self.named], parallel=False)
        return None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ToolUse:
        tools = _tools(body.get("tools"))
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise bad_request("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        choice = body.get("tool_choice")
        if choice is None:
            return cls(tools, "auto" if tools else "none", None, parallel)
        if choice in ("none", "auto", "required"):
            if choice != "none" and not tools:
                raise bad_request(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
            return cls(tools, choice, None, parallel)
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise bad_request(
                '\'tool_choice\' must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in {t.name for t in tools}:
            raise bad_request(f"'tool_choice' names {name!r}, which is not one of the tools", "tool_choice")
        return cls(tools, "function", name, parallel)


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' must be a list of at most {MAX_TOOLS} function tools", "tools")
    out: list[Tool] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise bad_request(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
        name, description = function.get("name"), function.get("description", "")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -", where)
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise bad_request(f"{where}.function: 'description' is a string, 'parameters' a JSON schema", where)
        if name in {t.name for t in out}:
            raise bad_request(f"{where}: two tools are named {name!r}", where)
        out.append(Tool(name, description, parameters))
    return tuple(out)


def tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's earlier ``tool_calls``, as the client sends them back."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request(f"{where}.tool_calls must be a list", where)
    out = []
    for j, call in enumerate(value):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise bad_request(f"{here} must have an 'id' and a 'function' with 'name' and 'arguments'", here)
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise bad_request(f"{here}.function: 'name' and 'arguments' (JSON text) are strings", here)
        try:
            json.loads(arguments)
        except ValueError:
            raise bad_request(f"{here}.function.arguments is not valid JSON", here) from None
        out.append(ToolCall(call["id"], name, arguments))
    return tuple(out)
