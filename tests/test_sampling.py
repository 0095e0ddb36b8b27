"""Sampling and incremental detokenisation, on real logits shapes and a real tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmosd.runtime.sampling import MIN_REPETITION_PENALTY, NonFiniteLogits, Sampler, SamplingParams
from llmosd.runtime.textstream import TextStream
from tests.conftest import SMOLLM2

VOCAB = 49152


def logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def draws(params: SamplingParams, x: np.ndarray, n: int = 400) -> Counter[int]:
    s = Sampler(params, VOCAB, [])
    return Counter(s.pick(x) for _ in range(n))


def test_greedy_is_the_argmax() -> None:
    x = logits()
    assert Sampler(SamplingParams(temperature=0), VOCAB, []).pick(x) == int(np.argmax(x))
    assert Sampler(SamplingParams(top_k=1, temperature=1.5), VOCAB, []).pick(x) == int(np.argmax(x))


def test_top_k_and_top_p_restrict_the_support() -> None:
    x = logits()
    top5 = set(np.argsort(-x)[:5].tolist())
    assert set(draws(SamplingParams(top_k=5, seed=1), x)) <= top5
    assert len(draws(SamplingParams(top_k=5, seed=1), x)) > 1  # sampling, not greedy
    # top-p: the smallest prefix of the sorted distribution reaching p
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1].tolist())
    seen = draws(SamplingParams(top_p=0.5, seed=2), x, 2000)
    assert set(seen) <= nucleus and len(seen) >= min(2, len(nucleus))


def test_a_wide_nucleus_falls_back_to_a_full_sort() -> None:
    flat = np.zeros(VOCAB, dtype=np.float32)  # uniform: top-p 0.9 needs ~44k tokens, past the shortlist
    seen = draws(SamplingParams(top_p=0.9, seed=3), flat, 3000)
    assert max(seen) > 600 and len(seen) > 2500


def test_temperature_sharpens_and_flattens() -> None:
    x = logits(4)
    best = int(np.argmax(x))
    cold = draws(SamplingParams(temperature=0.2, seed=5), x)[best]
    hot = draws(SamplingParams(temperature=2.0, seed=5), x)[best]
    assert cold > hot


def test_a_seed_reproduces_and_different_seeds_differ() -> None:
    x = logits(6)
    a = [Sampler(SamplingParams(seed=42), VOCAB, []).pick(x) for _ in range(3)]
    s1, s2 = Sampler(SamplingParams(seed=42), VOCAB, []), Sampler(SamplingParams(seed=42), VOCAB, [])
    assert [s1.pick(x) for _ in range(50)] == [s2.pick(x) for _ in range(50)]
    s3 = Sampler(SamplingParams(seed=43), VOCAB, [])
    s1 = Sampler(SamplingParams(seed=42), VOCAB, [])
    assert [s1.pick(x) for _ in range(50)] != [s3.pick(x) for _ in range(50)]
    assert len(set(a)) == 1


def test_min_p_keeps_the_tokens_near_the_best_one() -> None:
    x = np.full(VOCAB, -20.0, dtype=np.float32)
    x[[3, 4, 5, 6]] = [2.0, 1.9, 0.0, -1.0]  # probabilities relative to token 3: 1, 0.90, 0.14, 0.05
    assert set(draws(SamplingParams(min_p=0.5, seed=8), x, 600)) == {3, 4}
    assert set(draws(SamplingParams(min_p=0.1, seed=8), x, 600)) == {3, 4, 5}
    # after temperature: a hot row flattens the ratios, so the same min_p keeps more
    assert set(draws(SamplingParams(min_p=0.1, temperature=2.0, seed=8), x, 600)) == {3, 4, 5, 6}


def test_logit_bias_forces_and_bans_tokens_greedy_or_not() -> None:
    x = logits(9)
    best, other = int(np.argmax(x)), int(np.argmin(x))
    forced = SamplingParams(temperature=0, logit_bias=((other, 100.0),))
    assert Sampler(forced, VOCAB, []).pick(x) == other  # bias comes before the argmax
    banned = SamplingParams(temperature=0, logit_bias=((best, -100.0),))
    assert Sampler(banned, VOCAB, []).pick(x) != best
    assert best not in draws(SamplingParams(temperature=1.0, top_k=3, seed=10, logit_bias=((best, -100.0),)), x)
    assert Sampler(forced, VOCAB, []).pick(x) == other and x[other] == x.min()  # the caller's row is untouched


def test_a_grammar_mask_rules_tokens_out_whatever_else_asks_for_them() -> None:
    """Masked tokens are never drawn: not by greedy, not at temperature 2 over the whole vocabulary, not
    when logit_bias pushes one by +100; the allowed ones keep their relative odds."""
    x = logits(11)
    allowed = np.zeros(VOCAB, dtype=np.bool_)
    few = np.argsort(x)[:5]  # the five least likely tokens: nothing would pick them unmasked
    allowed[few] = True
    best_allowed = int(few[np.argmax(x[few])])
    assert Sampler(SamplingParams(temperature=0), VOCAB, []).pick(x, allowed) == best_allowed
    pushed = SamplingParams(temperature=2.0, seed=3, logit_bias=((int(np.argmax(x)), 100.0),))
    s = Sampler(pushed, VOCAB, [])
    picked = Counter(s.pick(x, allowed) for _ in range(600))
    assert set(picked) <= set(few.tolist()) and len(picked) > 1
    with pytest.raises(ValueError, match="allows no token"):
        Sampler(SamplingParams(), VOCAB, []).pick(x, np.zeros(VOCAB, dtype=np.bool_))


def test_the_smallest_accepted_values_keep_every_step_finite() -> None:
    """A temperature under float32's smallest normal samples as greedy; the smallest repetition penalty
    taken, with the largest bias, keeps the logits finite; a NaN or infinite logit fails the row."""
    x = logits(4)
    x[123] = 30.0  # a confident row, and 123 already seen: the penalty divides it
    for t in (1e-38, 1e-30, 9e-6):
        assert Sampler(SamplingParams(temperature=t, seed=1), VOCAB, []).pick(x) == 123
    hot = SamplingParams(temperature=2.0, seed=2, repetition_penalty=MIN_REPETITION_PENALTY, logit_bias=((123, 100.0),))
    assert Counter(Sampler(hot, VOCAB, [123]).pick(x) for _ in range(50)) == Counter({123: 50})
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[7] = bad
        with pytest.raises(NonFiniteLogits):
            Sampler(SamplingParams(temperature=0), VOCAB, []).pick(y)


def test_penalties_push_repeated_tokens_down() -> None:
    x = np.zeros(VOCAB, dtype=np.float32)
    x[7], x[8] = 5.0, 4.0
    rep = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), VOCAB, [7])
    assert rep.pick(x) == 8  # 7 was in the prompt: 5 / 2 < 4
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6), VOCAB, [7])
    assert freq.pick(x) == 7  # OpenAI penalties ignore the prompt
    freq.observe(7)
    assert freq.pick(x) == 7  # 5 - 0.6 > 4
    freq.observe(7)
    assert freq.pick(x) == 8  # 5 - 1.2 < 4
    pres = Sampler(SamplingParams(temperature=0, presence_penalty=1.5), VOCAB, [])
    pres.observe(7)
    assert pres.pick(x) == 8


@pytest.fixture(scope="module")
def tokenizer(store_dir: Path) -> Tokenizer:
    from llmosd.store import ModelStore

    store = ModelStore(store_dir)
    return Tokenizer.from_file(str(store.file_path(store.manifest(SMOLLM2), "tokenizer")))


def stream_all(tok: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    ts = TextStream(tok, stop)
    pieces = [ts.push(i) for i in tok.encode(text, add_special_tokens=False).ids]
    if not ts.stopped:
        pieces.append(ts.finish())
    return pieces, ts


def test_streamed_text_equals_the_whole_decode_including_multibyte_characters(tokenizer: Tokenizer) -> None:
    text = "Héllo wörld — 日本語のテキスト and emoji 🤖🚀 done."
    pieces, ts = stream_all(tokenizer, text)
    assert "".join(pieces) == text == ts.text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert sum(1 for p in pieces if p) > 5  # released as it goes, not all at the end


def test_stop_strings_cut_the_text_and_are_never_released(tokenizer: Tokenizer) -> None:
    pieces, ts = stream_all(tokenizer, "one two three four five", stop=("four",))
    assert ts.stopped and "".join(pieces) == "one two three "
    pieces, ts = stream_all(tokenizer, "abc END def", stop=("ENDX", " END"))
    assert ts.stopped and "".join(pieces) == "abc"
    # a partial match is held back and released when it turns out not to be a stop
    pieces, ts = stream_all(tokenizer, "a fou fourteen", stop=("four!",))
    assert not ts.stopped and "".join(pieces) == "a fou fourteen"


def test_the_grammar_engine_reads_each_tokens_bytes(tokenizer: Tokenizer) -> None:
    """SmolLM2's tokenizer.json (as transformers converts a GGUF) writes byte-level decoding as a decoder
    sequence; the vocabulary llguidance gets must still hold each token's bytes: a text's tokens, joined,
    are its UTF-8, multi-byte characters split across tokens included."""
    from llmosd.runtime.grammar import _Vocabulary

    vocab = _Vocabulary(tokenizer, frozenset({2}))
    for text in ['{"name": "Zoë", "age": 42}', "naïve café — 東京 🙂", "  two  spaces\n\ttab"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert b"".join(vocab.tokens[i] for i in ids) == text.encode()
    assert vocab.tokens[2] == b"<|im_end|>" and 2 in vocab.special_token_ids
