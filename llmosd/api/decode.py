"""The one JSON decoder for untrusted bodies: bounded in depth and in the number of values, finite numbers
only, text that is well-formed Unicode. Every route that reads JSON goes through ``decode_json`` (or
``decode_json_off_loop`` for a body of any size), so a value that passes here can be encoded again
(metrics labels, logs, responses) and walked without recursion limits, and decoding it costs a bounded
time whatever its shape."""

from __future__ import annotations

import asyncio
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmosd.api.errors import ApiError, bad_request

MAX_DEPTH = 64  # a chat with tools or a JSON schema nests far less; Python's own decoder stops near 1,000
# Values (strings, containers and the separators between members) one body may hold: OpenAI caps an
# embeddings request at 300,000 tokens, and 2^18 keeps the decoder's longest uninterruptible run (json's C
# scanner, which holds the GIL) near 20 ms on this project's machines. A body of 8 MiB of nested empty
# lists holds 4 million: decoded, it held every connection for 7 s.
MAX_VALUES = 1 << 18
OFF_LOOP_BYTES = 64 << 10  # above this a body is decoded on the decoder's thread, not the event loop
# One thread: concurrent hostile bodies queue here rather than contend with the loop for the GIL.
_DECODER = ThreadPoolExecutor(1, thread_name_prefix="json-decode")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes can name half a pair; UTF-8 cannot hold one


class _Refused(ValueError):
    pass


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float | int:
    """A JSON number written with a fraction or an exponent. One whose value is a whole number (1.0, 2e3)
    is an integer, as JSON Schema counts it, so "max_tokens": 8.0 is taken where 8 is (and 1e20 is a
    number too large for max_tokens, not a wrong type)."""
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range; send a finite number")
    if value.is_integer():
        return int(value)
    return value


def decode_json(raw: bytes, what: str = "request body") -> Any:
    """The value ``raw`` holds, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not valid UTF-8") from None
    if not text.strip():
        raise bad_request(f"{what} is empty; send a JSON object")
    if len(raw) > 4 * 1024:  # a body this small cannot hold enough values to matter
        count_values(raw, what)
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


async def decode_json_off_loop(raw: bytes, what: str = "request body") -> Any:
    """``decode_json``, on the decoder's thread where the body is large. The thread holds the GIL for one C
    call at a time: the count's passes over the bytes (milliseconds), then json's scanner, bounded by
    MAX_VALUES; the walk that follows is Python and lets the loop run every switch interval."""
    if len(raw) <= OFF_LOOP_BYTES:
        return decode_json(raw, what)
    return await asyncio.get_running_loop().run_in_executor(_DECODER, decode_json, raw, what)


def count_values(raw: bytes, what: str, limit: int = MAX_VALUES) -> int:
    """The array elements and object members ``raw`` holds, counted without decoding it: the brackets,
    braces and commas outside strings; past ``limit`` a 413. Every step is one pass of C over the bytes
    (no Python per value), so counting 8 MiB takes milliseconds whatever they hold."""
    # With escaped backslashes and escaped quotes gone, every quote left opens or closes a string.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    if text.count(b'"') > 4 * limit:  # each string is a key or a value: this many cannot fit the count
        raise _too_many(what, limit)
    outside = b"".join(text.split(b'"')[0::2])
    count = outside.count(b"[") + outside.count(b"{") + outside.count(b",")
    if count > limit:
        raise _too_many(what, limit)
    return count


def _too_many(what: str, limit: int) -> ApiError:
    return ApiError(413, f"{what} holds more than {limit} JSON values (array elements and object members); split it up")


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
