"""Choosing the next token from a row of logits: logit bias, penalties, temperature, top-k, min-p, top-p,
a seeded RNG.

One ``Sampler`` per sequence holds that sequence's random generator and token counts, so a seed
reproduces a sequence whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
_NUCLEUS_SHORTLIST = 512  # top-p first looks among the best 512 tokens; a full sort only if they fall short
# Below this a temperature samples as greedy (vLLM's _SAMPLING_EPS): logits a few units apart divided by it are
# already millions apart, and much further down float32 division overflows to infinity (1e-38 is under its
# smallest normal) and the softmax turns to NaN.
MIN_TEMPERATURE = 1e-5
# The smallest repetition penalty taken: a logit divided by less could pass float32's range; 0.01 already
# makes every seen token 100 times likelier, far past any use.
MIN_REPETITION_PENALTY = 0.01


class NonFiniteLogits(ValueError):
    """A row's logits hold NaN or infinity: that row fails with this rather than sample garbage."""

    def __init__(self) -> None:
        super().__init__("the model produced logits that are not finite (NaN or infinity), so generation stopped")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output
    frequency_penalty: float = 0.0  # OpenAI style, over the output only
    presence_penalty: float = 0.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit), sorted
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs bound; vLLM's default max_logprobs too


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (its raw logits: before bias, penalties or
    temperature, as vLLM reports by default), and the most likely tokens at that position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: FloatArray, token: int, top: int = 0) -> TokenLogprob:
    x = logits.astype(np.float64)
    peak = x.max()
    lp = x - (peak + np.log(np.exp(x - peak).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = np.argpartition(-lp, min(top, lp.size - 1))[:top]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = tuple((int(i), float(lp[i])) for i in ids)
    return TokenLogprob(token, float(lp[token]), best)


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._penalised = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self._counts = np.zeros(vocab_size, dtype=np.float32) if self._penalised else None
        self._seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)

    def observe(self, token: int) -> None:
        """Record an emitted token for the penalties."""
        if self._counts is not None:
            self._counts[token] += 1.0
        if self._seen is not None:
            self._seen.add(token)

    def pick(self, logits: FloatArray, allowed: npt.NDArray[np.bool_] | None = None) -> int:
        """The next token; ``allowed`` (a grammar's mask) rules out the rest before anything else sees them."""
        p = self.params
        x = self._penalise(logits)
        if not np.isfinite(x).all():  # ~20 us a row: a NaN would otherwise become a plausible-looking token
            raise NonFiniteLogits()
        if allowed is not None:
            if not allowed.any():
                raise ValueError("the grammar allows no token here")
            x = np.where(allowed, x, np.float32(-np.inf))
        if p.greedy:
            return int(np.argmax(x))
        x = x / np.float32(p.temperature)
        ids, probs = _top_k(x, p.top_k)
        if p.min_p > 0.0:  # llama.cpp's and vLLM's min-p: relative to the best token, so it scales with confidence
            keep = probs >= np.float32(p.min_p) * probs.max()
            ids, probs = ids[keep], probs[keep]
        if p.top_p < 1.0:
            ids, probs = _top_p(ids, probs, p.top_p)
        cdf = np.cumsum(probs, dtype=np.float64)
        j = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(j, len(ids) - 1)])

    def _penalise(self, logits: FloatArray) -> FloatArray:
        p = self.params
        if self._seen is None and self._counts is None and not self._bias_ids.size:
            return logits
        x = logits.astype(np.float32, copy=True)
        if self._bias_ids.size:  # first, as OpenAI applies it: to the logits the model gave, greedy included
            x[self._bias_ids] += self._bias
        if self._seen:
            seen = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self._counts is not None:
            x -= p.frequency_penalty * self._counts + p.presence_penalty * (self._counts > 0)
        return x


def _softmax(x: FloatArray) -> FloatArray:
    e = np.exp(x - x.max())
    out: FloatArray = e / e.sum()
    return out


def _top_k(x: FloatArray, k: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Token ids and their renormalised probabilities after the top-k cut (all tokens when k is 0)."""
    if 0 < k < x.size:
        ids = np.argpartition(x, x.size - k)[x.size - k :].astype(np.int64)
        return ids, _softmax(x[ids])
    return np.arange(x.size, dtype=np.int64), _softmax(x)


def _top_p(ids: npt.NDArray[np.int64], probs: FloatArray, top_p: float) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    if probs.size > _NUCLEUS_SHORTLIST:
        short = np.argpartition(probs, probs.size - _NUCLEUS_SHORTLIST)[probs.size - _NUCLEUS_SHORTLIST :]
        if probs[short].sum() < top_p:  # the nucleus is wider than the shortlist: sort everything
            short = np.arange(probs.size)
    else:
        short = np.arange(probs.size)
    order = short[np.argsort(-probs[short], kind="stable")]
    keep = int(np.searchsorted(np.cumsum(probs[order], dtype=np.float64), top_p)) + 1
    chosen = order[: min(keep, order.size)]
    return ids[chosen], probs[chosen]


# A model's default sampling parameters (its generation_config.json, its recipe, `llmosd models set`):
# the keys and the ranges a request's own fields are held to, plus max_tokens.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),  # open below
    "top_k": (-1, 1 << 20),  # -1 or 0: no cut
    "repetition_penalty": (MIN_REPETITION_PENALTY, 10.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "max_tokens": (1, 1 << 24),
}
_INTEGERS = frozenset({"top_k", "max_tokens"})
OPEN_BELOW = frozenset({"top_p"})  # ranges open at their lower end


def check_defaults(values: dict[str, object]) -> dict[str, float | int]:
    """Validated defaults; ValueError names the first bad key."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if key not in DEFAULT_RANGES:
            raise ValueError(f"unknown sampling parameter {key!r}; choose from {', '.join(DEFAULT_RANGES)}")
        lo, hi = DEFAULT_RANGES[key]
        integer = key in _INTEGERS
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if (
            number is None
            or (integer and not isinstance(number, int))
            or not lo <= number <= hi
            or (key in OPEN_BELOW and number == lo)
        ):
            kind = "an integer" if integer else "a number"
            above = " above the lower end" if key in OPEN_BELOW else ""
            raise ValueError(f"{key} must be {kind} in [{lo}, {hi}]{above}")
        out[key] = int(number) if integer else float(number)
    return out


def parse_number(key: str, text: str) -> float | int:
    """A default's value as a command line types it ("40", "0.7"); ValueError names it."""
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"{key}={text}: not a number") from None


def merge_defaults(current: dict[str, float | int], changes: dict[str, object]) -> dict[str, float | int]:
    """``current`` with ``changes`` applied (None unsets a key), validated."""
    out: dict[str, object] = dict(current)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return check_defaults(out)


def with_defaults(params: SamplingParams, given: frozenset[str], defaults: dict[str, float | int]) -> SamplingParams:
    """``params`` with each field the request did not give taken from the model's defaults."""
    fields: dict[str, Any] = {
        k: v for k, v in defaults.items() if k not in given and k in SamplingParams.__dataclass_fields__
    }
    if "top_k" in fields:
        fields["top_k"] = max(int(fields["top_k"]), 0)
    return replace(params, **fields) if fields else params
