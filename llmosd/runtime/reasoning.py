"""Models that think before they answer: how a model marks its thinking, found from its chat template and
tokens, and one sequence's place in it as tokens arrive.

The think-tag models (Qwen3, SmolLM3, the DeepSeek-R1 distills, QwQ, Granite's thinking variants) write
``<think>`` ... ``</think>`` and then the answer. Both tags are single tokens of their vocabularies, so the
split is made on token ids, never on decoded text: a tag can't be forged by text that merely spells it, and
nothing is held back waiting to see whether ``<`` starts one. Some templates open the block themselves
(the generation prompt ends ``<think>\\n``: R1 distills, Qwen3's *-Thinking-2507*); then the answer's tokens
begin inside it. gpt-oss's harmony channels are another format, not read here yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
# The template variables that turn thinking off where a template reads them (Qwen3 and SmolLM3 read
# ``enable_thinking``; DeepSeek-V3.1 and Granite 3.x ``thinking``).
TOGGLES = ("enable_thinking", "thinking")


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its thinking: the tags, their token ids, and the template variable that turns
    thinking off (None: the template has none; llmosd then closes an opened block itself)."""

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReasoningFormat:
        if d.get("format") != "think-tags":
            raise ValueError(f"unknown reasoning format {d.get('format')!r}")
        toggle = d.get("toggle")
        return cls(str(d["start"]), str(d["end"]), int(d["start_id"]), int(d["end_id"]), toggle and str(toggle))

    def opened_by(self, prompt: Sequence[int]) -> bool:
        """The prompt leaves a think block open (its last start tag comes after its last end tag): the
        answer's first tokens are thinking."""
        for token in reversed(prompt):
            if token == self.end_id:
                return False
            if token == self.start_id:
                return True
        return False


def detect(
    template: str | None, token_id: Callable[[str], int | None], variables: frozenset[str]
) -> ReasoningFormat | None:
    """A think-tag format where the model's template writes or reads thinking (it names ``<think>``,
    ``</think>`` or ``reasoning_content``) and both tags are single tokens; else None (``variables``: the
    template's undeclared variables, for its toggle)."""
    if not template or not any(s in template for s in (THINK_START, THINK_END, "reasoning_content")):
        return None
    start, end = token_id(THINK_START), token_id(THINK_END)
    if start is None or end is None:
        return None
    toggle = next((v for v in TOGGLES if v in variables), None)
    return ReasoningFormat(THINK_START, THINK_END, start, end, toggle)


@dataclass(frozen=True)
class ThinkingPlan:
    """One request's thinking: whether its prompt opened the block, and how many thinking tokens it may
    spend before llmosd closes the block itself (None: bounded by ``max_tokens`` alone)."""

    fmt: ReasoningFormat
    opened: bool
    budget: int | None = None


class Thinking:
    """Where one sequence is: inside its think block or past it. Each sampled token is classed as
    ``open``, ``think``, ``close`` (the tags themselves: never shown) or ``answer``."""

    def __init__(self, plan: ThinkingPlan) -> None:
        self.plan = plan
        self.active = plan.opened
        self.entered = plan.opened  # a block was opened: only the first one counts as thinking
        self.answered = False  # an answer token came: a tag after it is the answer's text
        self.tokens = 0  # thinking tokens so far (the tags not counted)

    def forced(self) -> int | None:
        """The end tag once the thinking budget is spent (the token to emit instead of sampling)."""
        budget = self.plan.budget
        if self.active and budget is not None and self.tokens >= budget:
            return self.plan.fmt.end_id
        return None

    def may_open(self) -> bool:
        """The next token may open the think block (nothing has been said yet)."""
        return not self.entered and not self.answered

    def take(self, token: int) -> str:
        fmt = self.plan.fmt
        if self.active:
            if token == fmt.end_id:
                self.active = False
                return "close"
            self.tokens += 1
            return "think"
        if token == fmt.start_id and self.may_open():
            self.active = self.entered = True
            return "open"
        self.answered = True
        return "answer"
