"""The feature-extraction task: sentence embeddings over OpenAI's ``POST /v1/embeddings``."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from llmosd.api.tasks import (
    GEN_HEADERS,
    IDS,
    MODEL_ERRORS,
    TEXTS,
    Config,
    bad_request,
    encoder_request,
    list_response,
    model_of,
    operation,
    text_request,
    texts_of,
    truncate_of,
)
from llmosd.runtime.adapters import Adapting
from llmosd.runtime.pooling import POOLINGS
from llmosd.runtime.tasks import EmbeddingModel
from llmosd.scheduler import ServedModel
from llmosd.store import ManifestError
from llmosd.tasks.contract import INVARIANT, Export, Source, Task, Tolerance, deferred

NAME = "feature-extraction"
routes = web.RouteTableDef()


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[Any]  # strings, or lists of token ids
    encoding_format: str
    dimensions: int | None
    truncate: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> EmbeddingsRequest:
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise bad_request("'dimensions' must be a positive integer", "dimensions")
        return cls(model_of(body), texts_of(body, limits, ids=True), fmt, dims, truncate_of(body))


def _width(served: ServedModel, model: str, asked: int | None) -> int | None:
    """Where to cut the vectors: None for the model's own width; a smaller ``dimensions`` only for a model
    exported as trained for it (``--option matryoshka=...``)."""
    runtime = served.loaded.manifest.runtime
    dims = int(runtime.get("dimensions") or 0)
    if asked is None or asked == dims:
        return None
    trained = runtime.get("matryoshka_dimensions")
    if not trained:
        why = f"model {model!r} produces {dims} dimensions and was not exported as trained for fewer"
        raise bad_request(
            f"{why} (llmosd export --option matryoshka=...): 'dimensions' cannot change that", "dimensions"
        )
    if asked > dims:
        raise bad_request(
            f"model {model!r} produces {dims} dimensions: 'dimensions' must be at most that", "dimensions"
        )
    return asked


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    req, served, run = await encoder_request(request, EmbeddingsRequest.parse, NAME)
    width = _width(served, req.model, req.dimensions)
    outputs = await run(req.texts)
    data = []
    for i, out in enumerate(outputs):
        vec = out.values.astype("<f4", copy=False)
        if width is not None:  # a Matryoshka model's leading dimensions, renormalised (as OpenAI's)
            vec = vec[:width] / max(float(np.linalg.norm(vec[:width])), 1e-12)
        emb: Any = base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return list_response(req.model, data, outputs)


PATHS = {
    "/v1/embeddings": {
        "post": operation(
            "Embed text (OpenAI shape)",
            ok={"type": "object", "required": ["object", "data", "model", "usage"]},
            body=text_request(
                {"oneOf": [*TEXTS["oneOf"], IDS, {"type": "array", "items": IDS, "minItems": 1}]},
                encoding_format={"enum": ["float", "base64"]},
                dimensions={"type": "integer", "minimum": 1},
                user={"type": "string"},
            ),
            errors=(*MODEL_ERRORS, 504),
            headers=GEN_HEADERS,
        )
    },
}


def adapter(a: Adapting) -> EmbeddingModel:
    pooling = a.setting("pooling")
    if pooling not in POOLINGS:
        raise ManifestError(f"{a.ref}: unknown pooling {pooling!r}")
    return EmbeddingModel(a.session, a.tokenizer(), pooling, bool(a.setting("normalize")))


_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def pooling_settings(src: Source) -> dict[str, Any]:
    """Pooling and normalisation from the sentence-transformers modules.json, if the model has one."""
    pooling, normalize = "mean", False
    for module in src.json("modules.json") or []:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg = src.json(f"{module.get('path', '')}/config.json") or {}
            chosen = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"unsupported pooling configuration {cfg}: exactly one mode is supported")
            pooling = chosen[0]
        elif kind.endswith(".Normalize"):
            normalize = True
    return {"pooling": pooling, "normalize": normalize}


def matryoshka(options: Mapping[str, str], dimensions: Any) -> dict[str, Any]:
    """``--option matryoshka=256,128,64``: the operator says the model was trained so that its leading
    dimensions are an embedding of their own (Matryoshka representation learning); nothing in a
    checkpoint says so. Requests may then ask ``dimensions`` at most the full width."""
    text = options.get("matryoshka")
    if text is None:
        return {}
    try:
        sizes = sorted({int(x) for x in text.split(",")}, reverse=True)
    except ValueError:
        raise ValueError(f"matryoshka={text}: a comma-separated list of dimensions") from None
    if not isinstance(dimensions, int) or not sizes or not all(0 < d <= dimensions for d in sizes):
        raise ValueError(f"matryoshka={text}: each dimension must be in [1, {dimensions}]")
    return {"matryoshka_dimensions": sizes}


def _settings(src: Source) -> dict[str, Any]:
    dimensions = src.outputs[0]["shape"][-1]
    return pooling_settings(src) | {"dimensions": dimensions} | matryoshka(src.options, dimensions)


TASK = Task(
    name=NAME,
    summary="Sentence embeddings (OpenAI's /v1/embeddings)",
    adapter=adapter,
    export=Export(
        optimum_task="feature-extraction",
        tolerances={
            "fp32": Tolerance(min_cosine=0.9999, max_abs_diff=1e-3, batch_invariance=INVARIANT),
            "fp16": Tolerance(min_cosine=0.999, max_abs_diff=1e-2, batch_invariance=INVARIANT),
            # the default precision: what a vector store indexes must stay within 0.99 of PyTorch
            "int8": Tolerance(min_cosine=0.99, mean_cosine=0.995, batch_invariance=INVARIANT),
        },
        settings=_settings,
        reference=deferred("exporters.references:embedding_reference"),
        figures=deferred("exporters.references:embedding_figures"),
        # For MiniLM per-token int8 runs 1.45x fp32 at min cosine 0.9925 (bench/int8.py).
        auto=("int8", "fp32"),
    ),
    routes=routes,
    paths=PATHS,
    latency_budget_ms=250.0,  # an embedding call should feel interactive
)
