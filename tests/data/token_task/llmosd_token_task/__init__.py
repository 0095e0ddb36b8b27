"""Token classification as an llmosd task: each token of each text gets a label and its score.

``POST /v1/token-classification`` takes ``{"model", "input": text or texts}`` and answers, per text, the
tokens with their character spans, label and score (what transformers' token-classification pipeline
gives with ``aggregation_strategy="none"``). Everything llmosd needs comes from ``llmosd.tasks`` and
``llmosd.api.tasks``; nothing in llmosd names this task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from llmosd.api.tasks import (
    GEN_HEADERS,
    MODEL_ERRORS,
    Config,
    encoder_request,
    list_response,
    model_of,
    operation,
    text_request,
    texts_of,
    truncate_of,
)
from llmosd.tasks import INVARIANT, Adapting, Batch, EncoderModel, Export, Output, Source, Task, Tolerance

NAME = "token-classification"


@dataclass(frozen=True)
class TokenOutput(Output):
    """``values``: one row of label scores per token; the tokens' character spans and which are special."""

    offsets: tuple[tuple[int, int], ...] = ()
    special: tuple[bool, ...] = ()


class TokenClassifier(EncoderModel):
    def __init__(self, session: Any, tokenizer: Any, labels: list[str]) -> None:
        super().__init__(session, tokenizer)
        self.labels = labels

    def run(self, batch: Sequence[Any]) -> list[Output]:
        logits, _ = self.forward(batch)
        z = logits.astype(np.float32)
        scores = np.exp(z - z.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out: list[Output] = []
        for i, e in enumerate(batch):
            n = len(e)  # the padding's rows are not the input's
            offsets = tuple(tuple(o) for o in getattr(e, "offsets", [(0, 0)] * n))
            special = tuple(bool(s) for s in getattr(e, "special_tokens_mask", [0] * n))
            out.append(TokenOutput(scores[i, :n], n, offsets, special))
        return out


def adapter(a: Adapting) -> TokenClassifier:
    return TokenClassifier(a.session, a.tokenizer(), [str(x) for x in a.setting("labels")])


@dataclass(frozen=True)
class TokenRequest:
    model: str
    texts: list[str]
    truncate: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> TokenRequest:
        return cls(model_of(body), texts_of(body, limits), truncate_of(body))


routes = web.RouteTableDef()


@routes.post("/v1/token-classification")
async def classify_tokens(request: web.Request) -> web.Response:
    req, served, run = await encoder_request(request, TokenRequest.parse, NAME)
    labels = list(served.loaded.manifest.runtime["labels"])
    outputs = await run(req.texts)
    data = []
    for i, (text, out) in enumerate(zip(req.texts, outputs, strict=True)):
        assert isinstance(out, TokenOutput)
        tokens = [
            {"start": s, "end": e, "text": text[s:e], "label": labels[int(row.argmax())], "score": float(row.max())}
            for row, (s, e), special in zip(out.values, out.offsets, out.special, strict=True)
            if not special
        ]
        data.append({"object": "token_classification", "index": i, "tokens": tokens})
    return list_response(req.model, data, outputs)


PATHS = {
    "/v1/token-classification": {
        "post": operation(
            "Label each token of each text (token classification)",
            ok={"type": "object", "required": ["object", "data", "model", "usage"]},
            body=text_request(),
            errors=(*MODEL_ERRORS, 504),
            headers=GEN_HEADERS,
        )
    }
}


def settings(src: Source) -> dict[str, Any]:
    id2label = src.config.get("id2label") or {}
    if not id2label:
        raise ValueError("config.json has no id2label: cannot name the token labels")
    return {"labels": [str(id2label[k]) for k in sorted(id2label, key=int)]}


def reference(src: Path, batch: Batch, runtime: Mapping[str, Any]) -> list[np.ndarray]:
    """PyTorch's label scores for each input's own tokens (run in the exporter's child only)."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(src), local_files_only=True).eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(batch.input_ids),
            attention_mask=torch.from_numpy(batch.attention_mask),
            token_type_ids=torch.from_numpy(batch.token_type_ids),
        ).logits
    scores = torch.softmax(logits.float(), -1).numpy()
    return [scores[i, : int(n)] for i, n in enumerate(batch.attention_mask.sum(1))]


def figures(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> dict[str, float]:
    diff = max(float(np.abs(r - c).max()) for r, c in zip(ref, cand, strict=True))
    agree = np.concatenate([r.argmax(-1) == c.argmax(-1) for r, c in zip(ref, cand, strict=True)])
    return {"max_abs_diff": diff, "label_agreement": float(agree.mean())}


def describe(backend: Any) -> dict[str, Any]:
    return {"labels": list(backend.labels)} if isinstance(backend, TokenClassifier) else {}


TASK = Task(
    name=NAME,
    summary="Token classification: a label per token (/v1/token-classification)",
    adapter=adapter,
    export=Export(
        optimum_task="token-classification",
        tolerances={
            "fp32": Tolerance(max_abs_diff=1e-4, label_agreement=0.99, batch_invariance=INVARIANT),
            "int8": Tolerance(max_abs_diff=0.05, label_agreement=0.9, batch_invariance=INVARIANT),
        },
        settings=settings,
        reference=reference,
        figures=figures,
        auto=("int8", "fp32"),
    ),
    routes=routes,
    paths=PATHS,
    describe=describe,
)
