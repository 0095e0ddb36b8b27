"""Chat answers in OpenAI's shapes: the whole message, or a choice's stream of deltas; where tools were
offered, the model's calls are read back into ``tool_calls`` (finish reason ``tool_calls``); a model's
thinking goes to ``reasoning_content`` (vLLM's and llama.cpp's field), its answer to ``content``."""

from __future__ import annotations

from typing import Any

from llmosd.scheduler import ToolCall, ToolCallStream, parse_tool_calls

Delta = tuple[dict[str, Any], str | None, Any]  # the delta, its finish reason, its logprobs


def _call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def message(
    text: str, finish: str | None, names: frozenset[str], thought: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """The assistant's message for a whole answer, and its finish reason; ``thought``: the thinking of a
    model that thinks (None: no field)."""
    said: dict[str, Any] = {"role": "assistant"}
    if thought is not None:
        said["reasoning_content"] = thought or None
    content, calls = parse_tool_calls(text, names) if names else (text, [])
    if calls:
        return said | {"content": content or None, "tool_calls": [_call(c) for c in calls]}, "tool_calls"
    return said | {"content": text}, finish


class Deltas:
    """One streamed choice: each chunk's text becomes content deltas (held back where a tool call may
    begin), the calls one delta each at the end, then the finish reason alone."""

    def __init__(self, names: frozenset[str]) -> None:
        self._tools = ToolCallStream(names) if names else None
        self._started = False

    def _opening(self) -> dict[str, Any]:
        """OpenAI's first delta of a choice names the role; the rest do not."""
        if self._started:
            return {}
        self._started = True
        return {"role": "assistant"}

    def __call__(
        self, text: str, finish: str | None, lps: dict[str, Any] | None, thought: str = ""
    ) -> list[tuple[dict[str, Any], str | None, Any]]:
        calls: list[ToolCall] = []
        if self._tools is not None:
            text = self._tools.push(text)
            if finish is not None:
                rest, calls = self._tools.finish()
                text += rest
        out: list[Delta] = []
        if thought:  # thinking comes before the answer, in deltas of its own
            out.append((self._opening() | {"reasoning_content": thought}, None, None))
        if text or not self._started or (lps and lps["content"] and not thought):
            out.append((self._opening() | {"content": text}, None, None))
        if lps is not None and out:  # the chunk's tokens' log-probabilities, on its last delta
            out[-1] = (out[-1][0], None, lps)
        for k, c in enumerate(calls):
            out.append(({"tool_calls": [{"index": k, **_call(c)}]}, None, None))
        if finish is not None:  # and the last one carries only the reason
            out.append(({}, "tool_calls" if calls else finish, None))
        return out
