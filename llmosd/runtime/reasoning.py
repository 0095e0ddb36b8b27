"""Models that think before they answer: how a model marks its thinking, found from its chat template and
tokens, and one sequence's place in it as tokens arrive.

Two formats, both split on token ids, never on decoded text (a tag can't be forged by text that merely
spells it, and nothing is held back waiting to see whether ``<`` starts one):

- **think tags** (Qwen3, SmolLM3, the DeepSeek-R1 distills, QwQ, Granite's thinking variants):
  ``<think>`` ... ``</think>``, then the answer. Some templates open the block themselves (the generation
  prompt ends ``<think>\\n``: R1 distills, Qwen3's *-Thinking-2507*); then the answer begins inside it.
- **harmony** (gpt-oss): messages ``<|start|>assistant<|channel|>CHANNEL<|message|>...<|end|>``; the
  ``analysis`` channel is the thinking, ``final`` the answer, ``commentary`` preambles (answer text). A
  message whose header names a recipient (``to=functions.NAME``) is a tool call: its body is the call's
  arguments, ended by ``<|call|>``; the engine hands it on as a generic ``<tool_call>`` block, which the
  API reads back into ``tool_calls`` as it reads every model's. The headers are never shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

THINK_START, THINK_END = "<think>", "</think>"
# The template variables that turn thinking off where a template reads them (Qwen3 and SmolLM3 read
# ``enable_thinking``; DeepSeek-V3.1 and Granite 3.x ``thinking``).
TOGGLES = ("enable_thinking", "thinking")
HARMONY_TAGS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")
HARMONY_CALL = "<|call|>"  # ends a tool call's message
RECIPIENT = re.compile(r"\bto=([A-Za-z0-9_.:-]+)")  # in a header: "to=functions.get_weather"
NOT_TOOLS = ("assistant", "user", "system", "developer")
TokenIds = Callable[[str], list[int]]  # a text's token ids (no special decoration)
Decode = Callable[[Sequence[int]], str]  # token ids as text, special tokens written out


class Tracker(Protocol):
    """Where one sequence is in a thinking model's output, token by token."""

    tokens: int  # thinking tokens so far
    entered: bool  # some thinking was entered (the answer after it drops its leading blank lines)

    @property
    def answering(self) -> bool:
        """The next tokens are the answer's: a grammar constrains them (not the thinking, not a header)."""
        ...

    def forced(self) -> int | None:
        """The token to emit instead of sampling (closing the thinking once its budget is spent)."""
        ...

    def also_allowed(self) -> tuple[int, ...]:
        """Tokens a grammar's mask must let through now (the tag that opens thinking, before the answer)."""
        ...

    def take(self, token: int) -> str:
        """Class a sampled token: ``think``, ``close`` (thinking ends), ``answer``, ``tag`` (never shown),
        ``call`` (a tool call's arguments) or ``called`` (the call's end)."""
        ...

    def recipient(self) -> str | None:
        """The function the message being read (or the one just ended) calls; None: not a call."""
        ...


@dataclass(frozen=True)
class ThinkingPlan:
    """One request's thinking: where its prompt leaves the model (``opened``: inside the thinking), and how
    many thinking tokens it may spend before llmosd closes the thinking itself (None: ``max_tokens``')."""

    fmt: ReasoningFormat | Harmony
    opened: bool
    budget: int | None = None

    def tracker(self, decode: Decode | None = None) -> Tracker:
        """``decode`` reads a header's recipient (harmony's tool calls); without it no call is read."""
        return self.fmt.tracker(self, decode)


@dataclass(frozen=True)
class ReasoningFormat:
    """Think tags: the tags, their token ids, and the template variable that turns thinking off (None: the
    template has none; llmosd then closes an opened block itself)."""

    start: str
    end: str
    start_id: int
    end_id: int
    toggle: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": "think-tags",
            "start": self.start,
            "end": self.end,
            "start_id": self.start_id,
            "end_id": self.end_id,
            "toggle": self.toggle,
        }

    def opened_by(self, prompt: Sequence[int]) -> bool:
        """The prompt leaves a think block open (its last start tag comes after its last end tag)."""
        for token in reversed(prompt):
            if token == self.end_id:
                return False
            if token == self.start_id:
                return True
        return False

    def plan(self, prompt: Sequence[int], budget: int | None) -> ThinkingPlan:
        return ThinkingPlan(self, self.opened_by(prompt), budget)

    def turned_off(self, prompt: Sequence[int], ids: TokenIds) -> list[int]:
        """What to append to a prompt rendered with thinking off: a block its template still opened, closed."""
        return ids(f"{self.end}\n\n") if self.opened_by(prompt) else []

    def banned_when_off(self) -> tuple[int, ...]:
        return (self.start_id,)

    def tracker(self, plan: ThinkingPlan, decode: Decode | None = None) -> Tracker:
        return ThinkTags(plan, self)


class ThinkTags:
    def __init__(self, plan: ThinkingPlan, fmt: ReasoningFormat) -> None:
        self.plan, self.fmt = plan, fmt
        self.active = plan.opened  # inside the block
        self.entered = plan.opened  # a block was opened: only the first one counts as thinking
        self.answered = False  # an answer token came: a tag after it is the answer's text
        self.tokens = 0

    @property
    def answering(self) -> bool:
        return not self.active

    def recipient(self) -> str | None:
        return None  # think-tag models write their calls in the answer's text

    def may_open(self) -> bool:
        return not self.entered and not self.answered

    def forced(self) -> int | None:
        budget = self.plan.budget
        return self.fmt.end_id if self.active and budget is not None and self.tokens >= budget else None

    def also_allowed(self) -> tuple[int, ...]:
        return (self.fmt.start_id,) if self.may_open() else ()

    def take(self, token: int) -> str:
        if self.active:
            if token == self.fmt.end_id:
                self.active = False
                return "close"
            self.tokens += 1
            return "think"
        if token == self.fmt.start_id and self.may_open():
            self.active = self.entered = True
            return "tag"
        self.answered = True
        return "answer"


@dataclass(frozen=True)
class Harmony:
    """gpt-oss's harmony format: the tags' token ids, and the token ids of the words its headers use."""

    start_id: int
    channel_id: int
    message_id: int
    end_id: int
    assistant: tuple[int, ...]  # "assistant"
    analysis: tuple[int, ...]  # "analysis"
    final: tuple[int, ...]  # "final"
    call_id: int | None = None  # <|call|>

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "format": "harmony",
            "start_id": self.start_id,
            "channel_id": self.channel_id,
            "message_id": self.message_id,
            "end_id": self.end_id,
            "assistant": list(self.assistant),
            "analysis": list(self.analysis),
            "final": list(self.final),
            "toggle": None,
        }

    @property
    def toggle(self) -> str | None:
        return None  # harmony's thinking cannot be turned off in the template: llmosd opens the final channel

    def channel_of(self, header: Sequence[int]) -> str:
        """``analysis``, ``final`` or ``commentary`` (anything else), from a header's tokens."""
        after = list(header)
        if self.channel_id in after:
            after = after[len(after) - after[::-1].index(self.channel_id) :]
        for name, ids in (("analysis", self.analysis), ("final", self.final)):
            if tuple(after[: len(ids)]) == ids:
                return name
        return "commentary"

    def state_after(self, prompt: Sequence[int]) -> tuple[str, str | None]:
        """Where a prompt leaves the model: in a header, or in a message of a channel."""
        for i in range(len(prompt) - 1, -1, -1):
            token = prompt[i]
            if token == self.message_id:
                start = max((j for j in range(i) if prompt[j] == self.start_id), default=0)
                return "message", self.channel_of(prompt[start:i])
            if token in (self.start_id, self.end_id):
                return "header", None
        return "header", None

    def plan(self, prompt: Sequence[int], budget: int | None) -> ThinkingPlan:
        mode, channel = self.state_after(prompt)
        return ThinkingPlan(self, mode == "message" and channel == "analysis", budget)

    def closing(self) -> list[int]:
        """Ends an analysis message and opens the final one."""
        return [self.end_id, self.start_id, *self.assistant, self.channel_id, *self.final, self.message_id]

    def turned_off(self, prompt: Sequence[int], ids: TokenIds) -> list[int]:
        """Thinking off: the final channel opened in the prompt (an analysis message it opened, ended)."""
        mode, channel = self.state_after(prompt)
        if mode == "message":
            return self.closing() if channel == "analysis" else []
        return [self.channel_id, *self.final, self.message_id]

    def banned_when_off(self) -> tuple[int, ...]:
        return ()

    def tracker(self, plan: ThinkingPlan, decode: Decode | None = None) -> Tracker:
        return HarmonyTracker(plan, self, decode)

    def recipient_of(self, header: str) -> str | None:
        """The function a header addresses (``functions.`` dropped), None where it addresses no tool."""
        found = RECIPIENT.search(header)
        if found is None or found.group(1) in NOT_TOOLS:
            return None
        return found.group(1).removeprefix("functions.")


class HarmonyTracker:
    def __init__(self, plan: ThinkingPlan, fmt: Harmony, decode: Decode | None = None) -> None:
        self.plan, self.fmt, self.decode = plan, fmt, decode
        self.to: str | None = None  # the recipient of the message being read, or of the call just ended
        self.mode = "message" if plan.opened else "header"
        self.channel: str | None = "analysis" if plan.opened else None
        self.header: list[int] = []
        self.entered = plan.opened
        self.tokens = 0
        self._queue: list[int] = []  # a closing sequence being emitted

    @property
    def answering(self) -> bool:
        return self.mode == "message" and self.channel == "final" and not self._queue

    def forced(self) -> int | None:
        budget = self.plan.budget
        spent = budget is not None and self.tokens >= budget
        if spent and not self._queue and self.mode == "message" and self.channel == "analysis":
            self._queue = self.fmt.closing()
        return self._queue.pop(0) if self._queue else None

    def also_allowed(self) -> tuple[int, ...]:
        return ()

    def recipient(self) -> str | None:
        return self.to

    def take(self, token: int) -> str:
        fmt = self.fmt
        if self.mode == "header":
            if token == fmt.message_id:
                self.mode, self.channel = "message", fmt.channel_of(self.header)
                self.entered = self.entered or self.channel == "analysis"
                self.to = fmt.recipient_of(self.decode(self.header)) if self.decode else None
            else:
                if not self.header:  # a new message: the last one's recipient is spent
                    self.to = None
                self.header.append(token)
            return "tag"
        if token in (fmt.end_id, fmt.call_id):
            thinking, calling = self.channel == "analysis", self.to is not None
            self.mode, self.channel, self.header = "header", None, []
            return "called" if calling else "close" if thinking else "tag"
        if token == fmt.start_id:  # a new message without ending the last one
            calling = self.to is not None
            self.mode, self.channel, self.header = "header", None, []
            return "called" if calling else "tag"
        if self.to is not None:
            return "call"
        if self.channel == "analysis":
            self.tokens += 1
            return "think"
        return "answer"


def from_dict(d: Mapping[str, Any]) -> ReasoningFormat | Harmony:
    """A manifest's ``runtime.reasoning``."""
    if d.get("format") == "think-tags":
        toggle = d.get("toggle")
        return ReasoningFormat(
            str(d["start"]), str(d["end"]), int(d["start_id"]), int(d["end_id"]), toggle and str(toggle)
        )
    if d.get("format") == "harmony":
        start, channel, message, end = (int(d[k]) for k in ("start_id", "channel_id", "message_id", "end_id"))
        assistant, analysis, final = (tuple(int(i) for i in d[k]) for k in ("assistant", "analysis", "final"))
        call = d.get("call_id")
        return Harmony(start, channel, message, end, assistant, analysis, final, None if call is None else int(call))
    raise ValueError(f"unknown reasoning format {d.get('format')!r}")


def detect(
    template: str | None, token_id: Callable[[str], int | None], variables: frozenset[str], ids: TokenIds
) -> ReasoningFormat | Harmony | None:
    """Harmony where the template writes its channels and its tags are single tokens; think tags where the
    template writes or reads thinking (it names ``<think>``, ``</think>`` or ``reasoning_content``) and
    both tags are single tokens; else None (``variables``: the template's undeclared ones, for its toggle)."""
    if not template:
        return None
    tags = [token_id(t) for t in HARMONY_TAGS]
    if "<|channel|>" in template and all(t is not None for t in tags):
        start, channel, message, end = (int(t) for t in tags if t is not None)
        assistant, analysis, final = (tuple(ids(w)) for w in ("assistant", "analysis", "final"))
        return Harmony(start, channel, message, end, assistant, analysis, final, token_id(HARMONY_CALL))
    if not any(s in template for s in (THINK_START, THINK_END, "reasoning_content")):
        return None
    start_id, end_id = token_id(THINK_START), token_id(THINK_END)
    if start_id is None or end_id is None:
        return None
    toggle = next((v for v in TOGGLES if v in variables), None)
    return ReasoningFormat(THINK_START, THINK_END, start_id, end_id, toggle)
