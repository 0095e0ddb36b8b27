"""The text-classification task: labels and their scores over ``POST /v1/classify`` (OpenAI has no route
for it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from llmosd.api.tasks import (
    GEN_HEADERS,
    MODEL_ERRORS,
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
from llmosd.runtime.tasks import ClassifierModel
from llmosd.tasks.contract import INVARIANT, Export, Source, Task, Tolerance, deferred

NAME = "text-classification"
routes = web.RouteTableDef()


@dataclass(frozen=True)
class ClassifyRequest:
    model: str
    texts: list[str]
    top_k: int | None
    truncate: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], limits: Config) -> ClassifyRequest:
        top_k = body.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise bad_request("'top_k' must be a positive integer", "top_k")
        return cls(model_of(body), texts_of(body, limits), top_k, truncate_of(body))


@routes.post("/v1/classify")
async def classify(request: web.Request) -> web.Response:
    req, served, run = await encoder_request(request, ClassifyRequest.parse, NAME)
    labels: list[str] = list(served.loaded.manifest.runtime["labels"])
    outputs = await run(req.texts)
    data = []
    for i, out in enumerate(outputs):
        order = np.argsort(-out.values)[: req.top_k or len(labels)]
        scores = [{"label": labels[j], "score": float(out.values[j])} for j in order]
        data.append(
            {
                "object": "classification",
                "index": i,
                "label": scores[0]["label"],
                "score": scores[0]["score"],
                "scores": scores,
            }
        )
    return list_response(req.model, data, outputs)


PATHS = {
    "/v1/classify": {
        "post": operation(
            "Classify text: labels and scores",
            body=text_request(top_k={"type": "integer", "minimum": 1}),
            errors=(*MODEL_ERRORS, 504),
            headers=GEN_HEADERS,
        )
    },
}


def adapter(a: Adapting) -> ClassifierModel:
    labels = [str(x) for x in a.setting("labels")]
    multi = a.runtime.get("problem_type") == "multi_label_classification"
    return ClassifierModel(a.session, a.tokenizer(), labels, multi)


def label_settings(src: Source) -> dict[str, Any]:
    """The classes' names in id order (config.json's id2label), and single- or multi-label."""
    id2label = src.config.get("id2label") or {}
    if not id2label:
        raise ValueError("config.json has no id2label: cannot name the classes")
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return {"labels": labels, "problem_type": src.config.get("problem_type") or "single_label_classification"}


TASK = Task(
    name=NAME,
    summary="Text classification: labels and scores (/v1/classify)",
    adapter=adapter,
    export=Export(
        optimum_task="text-classification",
        tolerances={
            "fp32": Tolerance(max_abs_diff=1e-3, label_agreement=1.0, batch_invariance=INVARIANT),
            "fp16": Tolerance(max_abs_diff=1e-2, label_agreement=0.95, batch_invariance=INVARIANT),
            "int8": Tolerance(max_abs_diff=0.05, label_agreement=0.9, batch_invariance=INVARIANT),
        },
        settings=label_settings,
        reference=deferred("exporters.references:classification_reference"),
        figures=deferred("exporters.references:classification_figures"),
    ),
    routes=routes,
    paths=PATHS,
)
