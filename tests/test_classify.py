"""/v1/classify on a tiny random BertForSequenceClassification matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np

from tests.conftest import SENTENCES, Daemon


async def test_classify_matches_pytorch(daemon: Daemon, tiny_classifier_src: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    texts = SENTENCES[:20]
    tok = AutoTokenizer.from_pretrained(str(tiny_classifier_src))
    model = BertForSequenceClassification.from_pretrained(str(tiny_classifier_src)).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        ref = torch.softmax(model(**enc).logits, dim=1).numpy()
    labels = ["negative", "neutral", "positive"]
    async with aiohttp.ClientSession(daemon.url) as s:
        async with s.post("/v1/classify", json={"model": "tiny-clf", "input": texts}) as r:
            body = await r.json()
            assert r.status == 200, body
        async with s.post("/v1/classify", json={"model": "tiny-clf", "input": "one", "top_k": 1}) as r:
            top1 = await r.json()
    got = np.array([[{d["label"]: d["score"] for d in item["scores"]}[lab] for lab in labels] for item in body["data"]])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert [item["label"] for item in body["data"]] == [labels[i] for i in ref.argmax(1)]
    assert len(top1["data"][0]["scores"]) == 1 and top1["usage"]["prompt_tokens"] > 0
