"""The one JSON decoder for untrusted bodies: bounded in depth, finite numbers only, text that is
well-formed Unicode. Every route that reads JSON goes through ``decode_json``, so a value that passes
here can be encoded again (metrics labels, logs, responses) and walked without recursion limits."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from llmosd.api.errors import bad_request

MAX_DEPTH = 64  # a chat with tools or a JSON schema nests far less; Python's own decoder stops near 1,000
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes can name half a pair; UTF-8 cannot hold one


class _Refused(ValueError):
    pass


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range; send a finite number")
    return value


def decode_json(raw: bytes, what: str = "request body") -> Any:
    """The value ``raw`` holds, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not valid UTF-8") from None
    if not text.strip():
        raise bad_request(f"{what} is empty; send a JSON object")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float)
    except _Refused as exc:
        raise bad_request(f"{what} is not valid: {exc}") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise bad_request(f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise bad_request(f"{what} is not valid: {str(exc)[:120]}") from None
    check(value, what)
    return value


def check(value: Any, what: str) -> None:
    """Depth within MAX_DEPTH and every string (keys included) well-formed, walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise bad_request(f"{what} holds a string with a lone UTF-16 surrogate (\\ud800-\\udfff)")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise bad_request(f"{what} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        else:
            stack.extend((v, depth + 1) for v in node)


def well_formed(text: str) -> bool:
    """True when ``text`` can be encoded as UTF-8 (no lone surrogate): path parameters, headers."""
    return text.isascii() or not _SURROGATE.search(text)
