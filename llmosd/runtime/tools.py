"""Tool calling: the tools a chat offers, written into the prompt, and the model's calls read back.

A template that takes ``tools`` (Qwen's, Llama 3's, Hermes') renders them itself. One that does not
(SmolLM2's) gets a generic system prompt, the format SmolLM2's own model card documents and Ollama's
smollm2 template uses: calls are a JSON list inside ``<tool_call>...</tool_call>``; a model that writes
one JSON object there (Hermes, Qwen) is read too. ``required`` or a named function is enforced by a
grammar: the calls follow the functions' parameter schemas.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from llmosd.runtime.grammar import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

GENERIC_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible \
functions. Based on the question, you will need to make one or more function/tool calls to achieve the \
purpose. If none of the functions can be used, answer the question directly.

You have access to the following tools:
<tools>{tools}</tools>

To call tools, answer with only this, and no other text (more calls as required):
<tool_call>[{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}, ...]</tool_call>"""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        """The shape templates and the generic prompt show: OpenAI's tool object."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments

    @staticmethod
    def new(name: str, arguments: Any) -> ToolCall:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ToolCall(f"call_{secrets.token_hex(12)}", name, text)

    def as_template(self) -> dict[str, Any]:
        """transformers' convention for templates: arguments as an object where they parse."""
        try:
            arguments: Any = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def generic_prompt(tools: list[Tool]) -> str:
    return GENERIC_PROMPT.format(tools=json.dumps([t.as_openai() for t in tools], ensure_ascii=False))


def written(calls: tuple[ToolCall, ...]) -> str:
    """Calls in the generic format: earlier ones in an assistant turn, and what a model that marks its calls
    otherwise (gpt-oss's harmony recipients) is handed on as, so the API reads every model's calls one way.
    Arguments that are not JSON stay the call's text (vLLM's harmony parser does the same)."""
    items = [{"name": c.name, "arguments": c.as_template()["function"]["arguments"]} for c in calls]
    return f"{OPEN}{json.dumps(items, ensure_ascii=False)}{CLOSE}"


def grammar(tools: list[Tool], parallel: bool) -> GrammarSpec:
    """Output that is only tool calls, each naming one of ``tools`` with arguments that match its
    parameters (``tool_choice`` ``required``, or a named function when ``tools`` is that one)."""
    defs: dict[str, Any] = {}
    arguments = []
    for i, t in enumerate(tools):
        if _refers(t.parameters):  # its "#/..." pointers name its own root: it moves under $defs, rebased
            defs[f"tool{i}"] = _rebased(t.parameters, f"#/$defs/tool{i}")
            arguments.append({"$ref": f"#/$defs/tool{i}"})
        else:
            arguments.append(t.parameters)
    one: dict[str, Any] = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": args},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t, args in zip(tools, arguments, strict=True)
        ],
        "x-guidance": _JSON_LAYOUT,
    }
    if defs:
        one["$defs"] = defs
    more = ' (", " call)*' if parallel else ""
    lark = f'start: "{OPEN}[" call{more} "]{CLOSE}"\ncall: %json {json.dumps(one)}'
    return GrammarSpec("grammar", lark)


def _refers(schema: Any) -> bool:
    """Whether a schema holds a local ``$ref`` ("#", "#/$defs/…": pydantic's output)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        return (isinstance(ref, str) and ref.startswith("#")) or any(_refers(v) for v in schema.values())
    return isinstance(schema, list) and any(_refers(v) for v in schema)


def _rebased(schema: Any, base: str) -> Any:
    """``schema`` with each local ``$ref`` pointing under ``base`` ("#/$defs/A" becomes base + "/$defs/A")."""
    if isinstance(schema, dict):
        out = {k: _rebased(v, base) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    return schema


def parse_tool_calls(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """The content before the first call, and the calls. Text that does not hold well-formed calls to
    known functions is all content (what vLLM's parsers do with a malformed call)."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    rest = text[start:]
    while rest.startswith(OPEN):
        end = rest.find(CLOSE)
        if end < 0:
            return text, []
        try:
            value = json.loads(rest[len(OPEN) : end])
        except ValueError:
            return text, []
        for item in value if isinstance(value, list) else [value]:
            if not (isinstance(item, dict) and item.get("name") in names):
                return text, []
            calls.append(ToolCall.new(item["name"], item.get("arguments", {})))
        rest = rest[end + len(CLOSE) :].lstrip()
    if rest:  # text after the calls: not a clean call
        return text, []
    return text[:start].rstrip(), calls


class ToolCallStream:
    """A streamed answer's content, held back from where a tool call may begin: text that cannot start
    ``<tool_call>`` goes out at once; from the tag on, the rest waits for the end and is read as calls."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._held = ""
        self._calling = False

    def push(self, text: str) -> str:
        self._held += text
        if self._calling:
            return ""
        at = self._held.find(OPEN)
        if at >= 0:
            self._calling = True
            out, self._held = self._held[:at], self._held[at:]
            return out
        keep = _partial_suffix(self._held, OPEN)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left: content not yet sent, and the calls (none: the held text is content)."""
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        _, calls = parse_tool_calls(held, self._names)
        return ("", calls) if calls else (held, [])


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
