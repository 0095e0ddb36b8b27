"""Chat answers in OpenAI's shapes: the whole message, or a choice's stream of deltas; where tools were
offered, the model's calls are read back into ``tool_calls`` (finish reason ``tool_calls``)."""

from __future__ import annotations

from typing import Any

from llmosd.scheduler import ToolCall, ToolCallStream, parse_tool_calls

Delta = tuple[dict[str, Any], str | None, Any]  # the delta, its finish reason, its logprobs


def _call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def message(text: str, finish: str | None, names: frozenset[str]) -> tuple[dict[str, Any], str | None]:
    """The assistant's message for a whole answer, and its finish reason."""
    content, calls = parse_tool_calls(text, names) if names else (text, [])
    if calls:
        return {"role": "assistant", "content": content or None, "tool_calls": [_call(c) for c in calls]}, "tool_calls"
    return {"role": "assistant", "content": text}, finish


class Deltas:
    """One streamed choice: each chunk's text becomes content deltas (held back where a tool call may
    begin), the calls one delta each at the end, then the finish reason alone."""

    def __init__(self, names: frozenset[str]) -> None:
        self._tools = ToolCallStream(names) if names else None
        self._started = False

    def __call__(
        self, text: str, finish: str | None, lps: dict[str, Any] | None
    ) -> list[tuple[dict[str, Any], str | None, Any]]:
        calls: list[ToolCall] = []
        if self._tools is not None:
            text = self._tools.push(text)
            if finish is not None:
                rest, calls = self._tools.finish()
                text += rest
        out: list[Delta] = []
        if not self._started:  # OpenAI's first chunk of a choice names the role
            self._started = True
            out.append(({"role": "assistant", "content": text}, None, lps))
        elif text or (lps and lps["content"]):
            out.append(({"content": text}, None, lps))
        for k, c in enumerate(calls):
            out.append(({"tool_calls": [{"index": k, **_call(c)}]}, None, None))
        if finish is not None:  # and the last one carries only the reason
            out.append(({}, "tool_calls" if calls else finish, None))
        return out
