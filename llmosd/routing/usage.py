"""How many tokens an upstream generated for one forwarded answer, read from the answer as it passes.

The upstream's own count wins: ``usage.completion_tokens`` of a whole JSON answer, or of a stream's
last event (sent when the client asked ``stream_options.include_usage``). A stream without it is
counted one token per event that carries text or a tool call, as OpenAI, vLLM and llama-server send
them (llama-server may join the bytes of one character, so this can count a little low). What is kept
to read is bounded: a whole answer past WHOLE_BYTES, or a stream line past LINE_BYTES, is not counted."""

from __future__ import annotations

import json
from typing import Any

WHOLE_BYTES = 4 << 20  # the most of a whole JSON answer kept to read its usage (a completion is far less)
LINE_BYTES = 1 << 20  # the most of one stream line kept: a longer one is not an event we can read


class Tally:
    """Fed the answer's bytes in order; ``completion_tokens`` is the count so far (0 if none can be read)."""

    def __init__(self) -> None:
        self.stream = False
        self._held = b""  # a stream's unfinished line
        self._whole = bytearray()  # a whole answer so far (grown in place: many chunks stay linear)
        self._reported: int | None = None
        self._counted = 0
        self._overflow = False  # a whole answer too big to keep: not counted
        self._skipping = False  # inside a stream line too long to keep: dropped up to its newline

    @property
    def completion_tokens(self) -> int:
        return self._reported if self._reported is not None else self._counted

    def begin(self, content_type: str) -> None:
        """The answer's headers are in: its type says how its body is read."""
        self.stream = content_type.split(";")[0].strip().lower() == "text/event-stream"

    def feed(self, chunk: bytes) -> None:
        if self._overflow:
            return
        if not self.stream:
            self._whole += chunk
            self._overflow = len(self._whole) > WHOLE_BYTES
            if self._overflow:
                self._whole = bytearray()
            return
        if self._skipping:
            _, newline, chunk = chunk.partition(b"\n")
            if not newline:
                return
            self._skipping = False
        *lines, self._held = (self._held + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())
        if len(self._held) > LINE_BYTES:
            self._held, self._skipping = b"", True

    def close(self) -> None:
        """At the answer's end: a whole answer is read now; a last stream line without its newline too."""
        held, self._held = self._held, b""
        if self._overflow:
            return
        if not self.stream:
            self._usage(_decode(bytes(self._whole)))
            self._whole = bytearray()
        elif held.startswith(b"data:"):
            self._event(held[5:].strip())

    def _event(self, data: bytes) -> None:
        doc = _decode(data)
        if not isinstance(doc, dict) or self._usage(doc):
            return
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            part = delta if isinstance(delta, dict) else choice  # chat's delta, or a completion's text
            if part.get("content") or part.get("text") or part.get("reasoning_content") or part.get("tool_calls"):
                self._counted += 1

    def _usage(self, doc: Any) -> bool:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            self._reported = tokens
            return True
        return False


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # "[DONE]", a keep-alive, or not JSON at all: nothing to count
        return None
