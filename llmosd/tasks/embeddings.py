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
    prompt_name: str | None = None  # sentence-transformers' name of one of the model's prompts
    input_type: str | None = None  # Cohere's, Voyage's and NVIDIA's: "query", "document" (or "passage")

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> EmbeddingsRequest:
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise bad_request("'dimensions' must be a positive integer", "dimensions")
        names = {}
        for key in ("prompt_name", "input_type"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 64):
                raise bad_request(f"'{key}' must be a name of 1 to 64 characters", key)
            names[key] = value
        return cls(model_of(body), texts_of(body, limits, ids=True), fmt, dims, truncate_of(body), **names)


# input_type's names for the two sides of retrieval, and the prompt names models give them
_SIDES = {
    "query": ("query", "search_query"),
    "search_query": ("query", "search_query"),
    "document": ("document", "passage", "search_document", "corpus"),
    "passage": ("passage", "document", "search_document", "corpus"),
    "search_document": ("search_document", "document", "passage", "corpus"),
}


def _prompt(served: ServedModel, req: EmbeddingsRequest) -> str:
    """The text put before each input: the named prompt, else the one ``input_type`` names where the
    model has it (Qwen3-Embedding's and e5's instruction for queries; a model without one embeds as is),
    else the model's default prompt, else nothing."""
    runtime = served.loaded.manifest.runtime
    prompts: Mapping[str, str] = runtime.get("prompts") or {}
    if req.prompt_name is not None:
        if req.prompt_name not in prompts:
            have = ", ".join(sorted(prompts)) or "none"
            raise bad_request(
                f"model {req.model!r} has no prompt {req.prompt_name!r} (its prompts: {have})", "prompt_name"
            )
        return prompts[req.prompt_name]
    if req.input_type is not None:
        if req.input_type not in _SIDES:
            raise bad_request(f"'input_type' must be one of {', '.join(_SIDES)}", "input_type")
        return next((prompts[n] for n in _SIDES[req.input_type] if n in prompts), "")
    default = runtime.get("default_prompt_name")
    return prompts.get(default, "") if isinstance(default, str) else ""


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
    prompt = _prompt(served, req)
    if prompt and not all(isinstance(t, str) for t in req.texts):
        raise bad_request("a prompt goes before text: token-id inputs cannot take one", "input")
    outputs = await run([prompt + t for t in req.texts] if prompt else req.texts)
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
                prompt_name={"type": ["string", "null"], "minLength": 1, "maxLength": 64},
                input_type={"enum": [*_SIDES, None]},
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
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
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


def prompt_settings(src: Source) -> dict[str, Any]:
    """sentence-transformers' prompts (config_sentence_transformers.json): the instruction a decoder
    embedder puts before a query (Qwen3-Embedding's, e5's), by name, and the one used when none is asked."""
    cfg = src.json("config_sentence_transformers.json") or {}
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError("config_sentence_transformers.json: 'prompts' must map names to strings")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"config_sentence_transformers.json: the default prompt {default!r} is not among its prompts")
    return {"prompts": prompts, "default_prompt_name": default} if prompts else {}


def _settings(src: Source) -> dict[str, Any]:
    dimensions = src.outputs[0]["shape"][-1]
    settings = pooling_settings(src) | prompt_settings(src) | {"dimensions": dimensions}
    return settings | matryoshka(src.options, dimensions)


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
