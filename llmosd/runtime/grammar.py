"""Constrained decoding with llguidance (the grammar engine llama.cpp, vLLM and onnxruntime-genai use).

A ``Grammars`` per model holds llguidance's view of the model's vocabulary (each token's bytes, built
once) and the grammars it compiled, by digest, so a schema sent a thousand times is compiled once. Each
constrained sequence gets its own matcher, a copy of the compiled one; ``fill_masks`` writes the masks of
several sequences at once on llguidance's own threads, without the GIL.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import numpy as np
import numpy.typing as npt
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

Kind = Literal["json_schema", "regex", "choice", "grammar"]
BoolArray = npt.NDArray[np.bool_]
MaskArray = npt.NDArray[np.int32]

# Python's json.dumps separators, and no free whitespace: a model sampled at temperature 1 cannot pad an
# answer with newlines until max_tokens (what a flexible-whitespace grammar allows), and the JSON reads
# the way models were trained to write it.
_JSON_OPTIONS: JsonCompileOptions = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# The grammar engine's budget. Lexer fuel counts derivative constructions (llguidance: "on the order of
# 100 ns" each; about 0.5 us measured here for a counted-repetition regex), and it is what a hostile pattern
# burns: `^(a{1000}){1000}$` spent the default million in 0.87 s here (4-5 s on slower boxes), holding the
# GIL for 0.2 s at a time, and with it the event loop. 50,000 to start (the first mask and the forced
# prefix, at compile time, off the loop and off the engine: 0.016 s here, the GIL held 6 ms at most; at
# 100,000 the loop waited 51-53 ms beside a running stream) and 50,000 a step (masks are computed while
# the model runs) bound what one grammar costs. Past them it fails with "too many expressions
# constructed", a 400 that names the budget. The schemas of the tests spend far less.
INITIAL_LEXER_FUEL = 50_000
STEP_LEXER_FUEL = 50_000
_LIMITS = llguidance.LLParserLimits(
    verbose_errors=False,  # errors name the schema's fault, not parser state
    initial_lexer_fuel=INITIAL_LEXER_FUEL,
    step_lexer_fuel=STEP_LEXER_FUEL,
)
_EXPLAINED = {  # llguidance's words for a spent budget or a grammar that admits nothing, and what they mean
    "too many expressions constructed": f"it needs more work than the grammar engine's budget allows "
    f"(llguidance lexer fuel: {INITIAL_LEXER_FUEL} to start, {STEP_LEXER_FUEL} a token); simplify its "
    "patterns (counted repetitions multiply)",
    "NoExtensionBias": "it admits no output at all (a schema that refers only to itself, or contradicts itself)",
}


def explain(error: str) -> str:
    """llguidance's error, with what it means where it is one of the budget's or an empty language."""
    for words, meaning in _EXPLAINED.items():
        if words in error:
            return meaning
    return error.replace("\n<non-verbose/>", "").strip()


class GrammarError(ValueError):
    """The grammar cannot be compiled (the message says why, in llguidance's words)."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as a request states it: a JSON schema (as canonical JSON), a regex, a list of choices
    (as JSON), or a Lark / GBNF grammar."""

    kind: Kind
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    def llguidance(self) -> str:
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        try:  # Lark, or GBNF (llama.cpp's format), which llguidance converts
            return llguidance.grammar_from("grammar", self.source)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None


def json_schema(schema: dict[str, Any] | bool) -> GrammarSpec:
    # Keys keep their order: the grammar writes properties in the order the schema lists them.
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))


@cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character each byte is written as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _uses(tree: Any, kind: str) -> bool:
    if isinstance(tree, dict):
        return tree.get("type") == kind or any(_uses(v, kind) for v in tree.values())
    if isinstance(tree, list):
        return any(_uses(v, kind) for v in tree)
    return False


def _state(part: Any) -> Any:
    """A tokenizers component (decoder, pre-tokenizer) as the JSON it serialises to, or None."""
    return json.loads(part.__getstate__()) if part is not None else None


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes and which ones are special. Computed
    from the tokenizer's own pieces: byte-level BPE (GPT-2's alphabet), SentencePiece's ``▁`` and
    ``<0xNN>`` byte fallback; llguidance's own reading of tokenizer.json misses byte-level decoding
    written as a decoder sequence (what transformers' GGUF conversion writes)."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int]) -> None:
        # The decoder's and pre-tokenizer's own JSON, not the whole tokenizer's: serialising and parsing
        # all of it (merges included) held the GIL for 0.1-0.2 s each, and with it the event loop.
        byte_level = _uses(_state(tokenizer.decoder), "ByteLevel") or _uses(
            _state(tokenizer.pre_tokenizer), "ByteLevel"
        )
        table = _unicode_to_byte()
        special = {int(i): t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.tokens: list[bytes] = []
        for i in range(tokenizer.get_vocab_size()):
            piece = tokenizer.id_to_token(i) or ""
            if i in special:
                self.tokens.append(piece.encode())
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif byte_level and all(c in table for c in piece):
                self.tokens.append(bytes(table[c] for c in piece))
            else:
                self.tokens.append(piece.replace("▁", " ").encode())
        self.special_token_ids = sorted(special)
        self.eos_token_id = min(eos_ids) if eos_ids else None
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


class Constraint:
    """One sequence's matcher: which tokens may come next, and the tokens it took. ``key``: its compiled
    grammar's digest (a grammar that fails midway is dropped from the cache by it)."""

    def __init__(self, matcher: llguidance.LLMatcher, key: str = "") -> None:
        self.matcher = matcher
        self.key = key

    def copy(self) -> Constraint:
        """Another sequence's matcher for the same grammar, in this one's state."""
        return Constraint(self.matcher.deep_copy(), self.key)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar failed at token {token}: {explain(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes nothing more (the sequence ends here)."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """One model's grammar engine: its vocabulary (built on first use, ~0.15 s) and an LRU of compiled
    grammars by digest. Thread-safe: prepare steps compile while the engine's worker computes masks."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], capacity: int = 64) -> None:
        self._tokenizer = tokenizer
        self._eos = eos_ids
        self._capacity = capacity
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self.compiles = 0  # grammars compiled (cache misses)

    def prepare(self) -> None:
        """Build the vocabulary now (at load), not on the first constrained request."""
        self._vocab()

    def _vocab(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                wrapper = llguidance.TokenizerWrapper(_Vocabulary(self._tokenizer, self._eos))
                # No slicer: building it is Rust that holds the GIL, and so the event loop, 0.11 s for
                # SmolLM2's 49k tokens (0.05 without); masks cost 56 us a row instead of 18, beside a
                # decode step of milliseconds, computed while the model runs.
                self._ll = llguidance.LLTokenizer(wrapper, eos_token=sorted(self._eos) or None, slices=[])
                self._executor = llguidance.LLExecutor(2)
            return self._ll

    def compile(self, spec: GrammarSpec) -> Constraint:
        """A fresh matcher for ``spec`` (compiled once per digest), whose first mask is computed here, so a
        grammar over the engine's budget or admitting nothing fails now, before its request is queued, and
        is never cached. Raises GrammarError. Blocking: call it off the event loop."""
        key = spec.digest
        with self._compiling:  # one compilation at a time: requests racing with one schema compile it once
            with self._lock:
                cached = self._compiled.get(key)
                if cached is not None:
                    self._compiled.move_to_end(key)
            if cached is None:
                cached = self._build(spec)
                self.compiles += 1
            constraint = Constraint(cached.deep_copy(), key)
            try:
                self._first_mask(constraint)
            except GrammarError:
                self.forget(key)  # its lexer (shared by every copy) may have failed: never hand it out again
                raise
            with self._lock:
                self._compiled[key] = cached
                while len(self._compiled) > self._capacity:
                    self._compiled.popitem(last=False)
        return constraint

    def forget(self, key: str) -> None:
        """Drop a compiled grammar (one whose sequence failed midway: the copies share its lexer's state)."""
        with self._lock:
            self._compiled.pop(key, None)

    def _first_mask(self, constraint: Constraint) -> None:
        """The mask before any token: the lexer's start-up work is done here, off the engine, and a grammar
        whose language is empty (only the end is allowed, and it is not complete) is refused."""
        ll = self._vocab()
        bits: MaskArray = np.zeros((1, (ll.vocab_size + 31) // 32), dtype=np.int32)
        fill_next_token_bitmask(constraint.matcher, bits, 0)
        matcher = constraint.matcher
        if matcher.is_error():
            raise GrammarError(explain(matcher.get_error()))
        allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little"))
        if not matcher.is_accepting() and not set(allowed.tolist()) - set(self._eos):
            raise GrammarError(_EXPLAINED["NoExtensionBias"])
        # The tokens every answer starts with (`{"a": "` for a required property) lead the lexer into the
        # first lexemes: taking them on a copy builds those here too, where a pattern over the budget
        # fails before its request is queued rather than at its first token.
        forced = matcher.compute_ff_tokens()
        if forced:
            probe = matcher.deep_copy()
            if probe.consume_tokens(forced):
                fill_next_token_bitmask(probe, bits, 0)
            if probe.is_error():
                raise GrammarError(explain(probe.get_error()))

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        ll = self._vocab()
        try:
            grammar = spec.llguidance()
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll, limits=_LIMITS)
        if error:
            raise GrammarError(messages[0] if messages else "the grammar does not compile")
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def fill_masks(self, constraints: list[Constraint], vocab: int) -> BoolArray:
        """Rows of allowed tokens, one per constraint, ``vocab`` wide (the logits' width)."""
        ll = self._vocab()
        words = (ll.vocab_size + 31) // 32
        bits: MaskArray = np.zeros((len(constraints), words), dtype=np.int32)
        assert self._executor is not None
        fill_next_token_bitmask_par(self._executor, [(c.matcher, i) for i, c in enumerate(constraints)], bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").astype(np.bool_)
        if allowed.shape[1] >= vocab:
            return allowed[:, :vocab]
        return np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))  # logits past the tokenizer: never
