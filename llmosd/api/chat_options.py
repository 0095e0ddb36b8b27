"""What a chat request says of the model's template and its thinking, in vLLM's names: the template's own
variables (``chat_template_kwargs``, ``documents``), how the prompt ends (``add_generation_prompt``,
``continue_final_message``), ``reasoning_effort`` (``"none"`` turns thinking off,
other levels reach templates that read them: gpt-oss), ``max_reasoning_tokens`` and ``include_reasoning``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmosd.api.errors import bad_request
from llmosd.runtime.chat import CLOSED, CONTINUE, OPEN, RESERVED
from llmosd.runtime.reasoning import TOGGLES

EFFORTS = ("none", "minimal", "low", "medium", "high")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a template variable's name
MAX_TEMPLATE_VARS = 64


@dataclass(frozen=True)
class ChatOptions:
    template_vars: dict[str, Any] = field(default_factory=dict)
    thinking: bool | None = None  # None: as the template has it; False: off
    max_reasoning_tokens: int | None = None  # None: bounded by max_tokens alone
    include_reasoning: bool = True  # False: the thinking is left out of the answer (still not in content)
    turn: str = OPEN  # add_generation_prompt (open), not (closed), or continue_final_message (continue)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ChatOptions:
        variables = _template_vars(body.get("chat_template_kwargs"))
        documents = body.get("documents")
        if documents is not None:
            if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
                raise bad_request("'documents' must be a list of objects (each document's fields)", "documents")
            variables["documents"] = documents
        effort = body.get("reasoning_effort")
        if effort is not None and effort not in EFFORTS:
            raise bad_request(f"'reasoning_effort' must be one of {', '.join(EFFORTS)}", "reasoning_effort")
        if effort not in (None, "none"):
            variables.setdefault("reasoning_effort", effort)
        off = effort == "none" or any(variables.get(t) is False for t in TOGGLES)
        budget = body.get("max_reasoning_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise bad_request("'max_reasoning_tokens' must be an integer of at least 0", "max_reasoning_tokens")
        include = body.get("include_reasoning", True)
        if not isinstance(include, bool):
            raise bad_request("'include_reasoning' must be true or false", "include_reasoning")
        return cls(variables, False if off else None, budget, include, _turn(body))


def _turn(body: dict[str, Any]) -> str:
    """vLLM's add_generation_prompt (default true) and continue_final_message (default false)."""
    opened, continued = body.get("add_generation_prompt", True), body.get("continue_final_message", False)
    for key, value in (("add_generation_prompt", opened), ("continue_final_message", continued)):
        if not isinstance(value, bool):
            raise bad_request(f"'{key}' must be true or false", key)
    if opened and continued:
        raise bad_request(
            "'continue_final_message' continues the final message: send it with 'add_generation_prompt': false",
            "continue_final_message",
        )
    return CONTINUE if continued else OPEN if opened else CLOSED


def _template_vars(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_TEMPLATE_VARS:
        raise bad_request(
            f"'chat_template_kwargs' must be an object of at most {MAX_TEMPLATE_VARS} template variables",
            "chat_template_kwargs",
        )
    taken = sorted(k for k in value if k in RESERVED)
    if taken:
        raise bad_request(
            f"'chat_template_kwargs' may not set {', '.join(taken)}: llmosd sets it from the request",
            "chat_template_kwargs",
        )
    if not all(_NAME.fullmatch(k) for k in value):
        raise bad_request("'chat_template_kwargs' keys must be template variable names", "chat_template_kwargs")
    return dict(value)
