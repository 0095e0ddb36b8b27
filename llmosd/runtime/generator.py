"""The text-generation task adapter: a causal LM with its tokenizer, stop ids, context and chat template."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from tokenizers import Tokenizer

from llmosd.runtime.causal_lm import CausalLM, RightAlignedRows
from llmosd.runtime.chat import OPEN, ChatTemplate, Message
from llmosd.runtime.decoder import Decoder
from llmosd.runtime.fused_lm import FusedLM, is_fused
from llmosd.runtime.grammar import Grammars
from llmosd.runtime.invariance import ALONE, Invariance, settle
from llmosd.runtime.reasoning import Harmony, ReasoningFormat, detect, from_dict
from llmosd.runtime.tools import Tool

log = logging.getLogger(__name__)


class TextGenerator:
    def __init__(
        self,
        session: Any,
        tokenizer_path: Path,
        runtime: dict[str, Any],
        max_context: int = 0,
        max_sequences: int = 16,
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # a prompt longer than the context is refused, never cut silently
        model_context = int(runtime.get("max_seq_length") or 2048)
        self.context_length = min(model_context, max_context) if max_context > 0 else model_context
        self.session = session
        # A fused graph's cache is preallocated: a slot per row decoded together, the context long.
        self.invariance = Invariance(True, ALONE, 0.0)  # until warmup() measures it
        self.rechecked: dict[str, Any] | None = None  # the gate's short form on this CPU, where it ran
        self.lm = self.decoder(max_sequences, self.context_length, prefix_cache=True)
        # What a request's absent sampling fields take (the manifest's, then `llmosd models set`).
        self.sampling_defaults: dict[str, float | int] = dict(runtime.get("sampling") or {})
        self.eos_token_ids = frozenset(int(i) for i in runtime.get("eos_token_ids") or [])
        template = runtime.get("chat_template")
        self.chat = ChatTemplate(template, self._token(runtime.get("bos_token_id")), self._eos()) if template else None
        self.reasoning = self._reasoning(runtime)
        self.grammars = Grammars(self.tokenizer, self.eos_token_ids)  # its vocabulary built by warmup()

    def decoder(self, rows: int, positions: int, prefix_cache: bool = False) -> Decoder:
        """A cache of its own over this model's session (the engine's, with a prefix cache where the graph
        can run a prompt against cached positions: a fused one; the tuner's, beside it)."""
        vocab = self.tokenizer.get_vocab_size()
        if is_fused(self.session):
            lm = FusedLM(self.session, vocab, rows, positions, prefix_cache)
            lm.min_rows = self.invariance.min_rows  # the tuner times steps as the engine runs them
            return lm
        return RightAlignedRows(CausalLM(self.session, vocab))

    def _reasoning(self, runtime: Mapping[str, Any]) -> ReasoningFormat | Harmony | None:
        """How the model marks its thinking: the manifest's word (set at export), or, for a manifest written
        before exports recorded it, found the same way from the template and the tokenizer."""
        if "reasoning" in runtime:
            given = runtime["reasoning"]
            return from_dict(given) if isinstance(given, Mapping) else None
        if self.chat is None:
            return None
        words = lambda text: self.encode(text, special=False)  # noqa: E731
        return detect(runtime.get("chat_template"), self.tokenizer.token_to_id, self.chat.variables, words)

    def _token(self, token_id: object) -> str:
        return (self.tokenizer.id_to_token(token_id) or "") if isinstance(token_id, int) else ""

    def _eos(self) -> str:
        return self._token(min(self.eos_token_ids)) if self.eos_token_ids else ""

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of a prompt; ``special`` adds the tokenizer's BOS/EOS decoration (raw completions)."""
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def render_chat(
        self,
        messages: list[Message],
        tools: list[Tool] | None = None,
        variables: Mapping[str, Any] | None = None,
        turn: str = OPEN,
    ) -> list[int]:
        """Token ids of a chat rendered with the model's template (it writes the special tokens itself)."""
        if self.chat is None:
            raise ValueError("this model has no chat template: use /v1/completions with a raw prompt")
        return self.encode(self.chat.render(messages, tools, variables, turn), special=False)

    def warmup(self) -> None:
        """Prefills and decode steps at one and two rows, so the first request pays no set-up; they also
        settle how a lone row is decoded (llmosd.runtime.invariance)."""
        # The grammar engine's view of the vocabulary: Rust that holds the GIL for up to ~60 ms (SmolLM2's
        # 49k tokens), built with the model rather than inside the first constrained request, where it
        # held the daemon's event loop past its 100 ms watch on a loaded box.
        self.grammars.prepare()
        a = self.encode("warm up", special=False) or [0]
        b = self.encode("warm up a second row", special=False) or [0]
        self.invariance = settle(self.lm, a, b)
        if not self.invariance.exact:
            log.warning(
                "a row's tokens may depend on the rows decoded beside it on this CPU (logits differ by up to %.3g)",
                self.invariance.max_logit_diff,
            )

    def recheck(self, reference: Mapping[str, Any]) -> dict[str, Any]:
        """The validation gate's short form, on this box's kernels: the exporting box's text teacher-forced
        through the served decoder (a position a step, as the engine runs it), its next token at each
        decisive position against PyTorch's there; and whether a row decodes alone as beside others."""
        ids, positions, top1 = reference.get("ids"), reference.get("positions"), reference.get("top1")
        if not (_ints(ids) and _ints(positions) and _ints(top1) and len(positions) == len(top1) > 0):
            raise ValueError("the manifest's recheck data is malformed")
        if max(positions) >= len(ids) or len(ids) >= self.context_length:
            raise ValueError("the manifest's recheck data does not fit this model")
        logits, row = self.lm.prefill(ids[:1])
        got = [int(logits.argmax())]
        try:
            for token in ids[1:]:
                got.append(int(self.lm.decode([row], [token])[0].argmax()))
        finally:
            self.lm.free(row)
        agree = np.asarray([got[p] for p in positions]) == np.asarray(top1)
        return {
            "top1_agreement": float(agree.mean()),
            "positions": len(positions),
            "batch_invariance": self.invariance.as_dict(),
        }


def _ints(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
