"""Log-probabilities in OpenAI's two shapes: chat's ``logprobs.content`` and completions' ``logprobs``
(tokens, token_logprobs, top_logprobs, text_offset). A token's text is its own decoding; where it is part
of a character (byte-level BPE), that is U+FFFD, and ``bytes`` are those of that text, as vLLM gives them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmosd.scheduler import TokenLogprob

Decode = Callable[[list[int]], str]  # token ids to text, special tokens written out


def shown(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], finish: str | None, stop_ids: frozenset[int]
) -> Sequence[TokenLogprob]:
    """The entries of the tokens the answer holds: a sequence that ended on a stop id (end of sequence,
    ``stop_token_ids``) has that id in its tokens but not in its text."""
    if finish == "stop" and token_ids and token_ids[-1] in stop_ids and logprobs:
        return logprobs[:-1]
    return logprobs


def _text(decode: Decode, token: int) -> str:
    return decode([token])


def chat_content(tokenizer: Decode, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def completion_logprobs(
    tokenizer: Decode, scored: Sequence[tuple[int, TokenLogprob | None]], offset: int = 0
) -> dict[str, Any]:
    """``scored``: (token id, its entry) in order; the prompt's first token has none (null, as OpenAI's).
    ``offset``: where the first token's text starts in the choice's text (a stream's later chunks)."""
    tokens = [_text(tokenizer, token) for token, _ in scored]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for _, e in scored],
        # one object per position, as OpenAI's; tokens whose texts coincide keep the likelier
        "top_logprobs": [
            None if e is None else {_text(tokenizer, t): lp for t, lp in reversed(e.top)} for _, e in scored
        ],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Logprobs:
    """What one request's answers show of their tokens' log-probabilities, in either route's shape."""

    tokenizer: Decode
    stop_ids: frozenset[int]  # ids a sequence stops on without showing them

    def chat(self, ids: Sequence[int], entries: Sequence[TokenLogprob], finish: str | None) -> dict[str, Any]:
        return {"content": chat_content(self.tokenizer, shown(ids, entries, finish, self.stop_ids)), "refusal": None}

    def completion(
        self,
        prompt_ids: Sequence[int],
        prompt: Sequence[TokenLogprob | None],
        ids: Sequence[int],
        entries: Sequence[TokenLogprob],
        finish: str | None,
        offset: int,
    ) -> dict[str, Any]:
        """``prompt``: the prompt's entries where echo scored it (else empty), then the answer's."""
        scored: list[tuple[int, TokenLogprob | None]] = list(zip(prompt_ids, prompt, strict=True)) if prompt else []
        scored += [(e.token, e) for e in shown(ids, entries, finish, self.stop_ids)]
        return completion_logprobs(self.tokenizer, scored, offset)
