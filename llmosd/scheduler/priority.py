"""Priority classes: high drains first, and waiting raises a request one class per ``AGING_S`` seconds,
so low never starves however much high traffic there is."""

from __future__ import annotations

PRIORITIES = ("high", "normal", "low")
HIGH, NORMAL, LOW = 0, 1, 2
AGING_S = 2.0


def parse_priority(value: str) -> int:
    try:
        return PRIORITIES.index(value.strip().lower())
    except ValueError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {value!r}") from None


def rank(priority: int, waited_s: float, order: int) -> tuple[int, int]:
    """Sort key of a waiting request: its class lowered by its waiting time, then arrival order."""
    return (priority - int(waited_s / AGING_S), order)
