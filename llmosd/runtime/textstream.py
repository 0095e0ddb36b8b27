"""Turning generated token ids into text as they arrive, and stopping at stop strings.

Decoding token by token breaks multi-byte characters and word-initial spaces, so text is decoded over
a window that starts a few tokens back (the prefix/read offsets of Hugging Face's TGI) and only
complete characters are released. Text that could be the start of a stop string is held back until it
is known not to be one, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._pending = ""
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Add one token; return the text that may be released now (often empty)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(self._pending + after[len(before) :])

    def reset(self) -> None:
        """Start over (what was released stays in ``text``): a new piece of text after ``finish``."""
        self._ids, self._prefix, self._read, self._pending = [], 0, 0, ""

    def finish(self) -> str:
        """The end of the sequence: release what was held back (it cannot start a stop string now)."""
        if self.stopped:
            return ""
        before = self._tok.decode(self._ids[self._prefix : self._read])
        tail = self._tok.decode(self._ids[self._prefix :])[len(before) :]
        out: str = self._pending + tail.rstrip("\ufffd")
        self._pending = ""
        self.text += out
        return out

    def _release(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            self.text += text[:cut]
            return text[:cut]
        hold = _longest_stop_prefix(text, self._stop)
        out, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += out
        return out


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
