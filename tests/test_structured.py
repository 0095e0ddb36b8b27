"""Structured outputs on the real daemon serving SmolLM2 int4: the official openai SDK's ``parse`` with a
Pydantic model, 50 answers sampled at temperature 1 that all validate against their schema
(``jsonschema``), vLLM's guided_* and structured_outputs fields on both routes, streaming, and
unconstrained rows that run beside constrained ones unchanged."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.conftest import SMOLLM2, Daemon

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "remote": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "skills", "remote"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Invent a person who works in a hospital. Answer in JSON."}]


async def post(s: aiohttp.ClientSession, daemon: Daemon, path: str, body: dict[str, Any]) -> Any:
    async with s.post(daemon.url + path, json={"model": SMOLLM2, **body}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def generation(s: aiohttp.ClientSession, daemon: Daemon) -> dict[str, Any]:
    async with s.get(daemon.url + "/api/status") as r:
        models = {m["name"]: m for m in (await r.json())["models"]}
    out: dict[str, Any] = models[SMOLLM2]["instances"][0]["generation"]
    return out


def test_openai_sdk_parse_returns_the_pydantic_object(daemon: Daemon) -> None:
    import openai

    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)
        population_millions: int = Field(ge=0, le=100)

    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed-on-loopback")
    completion = client.chat.completions.parse(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Describe Paris as JSON: its name, country and population."}],
        response_format=City,
        max_tokens=200,  # above the schema's longest answer (two 40-character strings): it must end by itself
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City) and choice.message.parsed.name, choice.message.content
    assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


async def test_fifty_answers_sampled_at_temperature_one_all_validate(daemon: Daemon) -> None:
    """Whatever the model would rather write, every answer parses and validates: the grammar masks each
    step. 50 answers: three requests of n=16 and one of 2, at once (rows of one batch)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    async with aiohttp.ClientSession() as s:
        before = await generation(s, daemon)
        bodies = [
            {"messages": ASK, "response_format": fmt, "temperature": 1.0, "n": n, "max_tokens": 160, "seed": 1000 * i}
            for i, n in enumerate([16, 16, 16, 2])
        ]
        answers = await asyncio.gather(*(post(s, daemon, "/v1/chat/completions", b) for b in bodies))
        after = await generation(s, daemon)
    choices = [c for a in answers for c in a["choices"]]
    assert len(choices) == 50
    texts = set()
    for c in choices:
        assert c["finish_reason"] == "stop", c
        jsonschema.validate(json.loads(c["message"]["content"]), PERSON)
        texts.add(c["message"]["content"])
    assert len(texts) > 40  # sampled (each choice has a seed of its own), not one answer repeated
    # One schema, one compilation: the other 49 sequences copied the compiled grammar.
    assert after["grammar_compiles"] - before["grammar_compiles"] <= 1
    assert after["constrained_tokens"] > before["constrained_tokens"]


async def test_vllms_guided_fields_on_both_routes(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        choice = await post(
            s,
            daemon,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Is 'I loved this film' positive or negative?"}],
                "guided_choice": ["positive", "negative"],
                "temperature": 1.0,
                "n": 4,
            },
        )
        assert {c["message"]["content"] for c in choice["choices"]} <= {"positive", "negative"}
        phone = await post(
            s,
            daemon,
            "/v1/completions",
            {"prompt": "The office phone number is", "guided_regex": r" \d{3}-\d{4}", "temperature": 1.0, "n": 3},
        )
        for c in phone["choices"]:
            assert re.fullmatch(r" \d{3}-\d{4}", c["text"]) and c["finish_reason"] == "stop", c
        gbnf = 'root ::= "The answer is " [0-9]+ "."'
        grammar = await post(
            s,
            daemon,
            "/v1/completions",
            {"prompt": "What is 6 times 7?", "structured_outputs": {"grammar": gbnf}, "max_tokens": 20},
        )
        assert re.fullmatch(r"The answer is \d+\.", grammar["choices"][0]["text"]), grammar
        obj = await post(
            s,
            daemon,
            "/v1/completions",
            # greedy: at temperature 1 an object may go on past any max_tokens (it is still valid as far as it got)
            {
                "prompt": "A JSON object describing a cat:",
                "response_format": {"type": "json_object"},
                "max_tokens": 120,
                "temperature": 0,
            },
        )
        assert obj["choices"][0]["finish_reason"] == "stop", obj
        assert isinstance(json.loads(obj["choices"][0]["text"]), dict)


async def test_a_streamed_constrained_answer_is_the_json_in_pieces(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        body = {
            "model": SMOLLM2,
            "messages": ASK,
            "stream": True,
            "max_tokens": 160,
            "guided_json": json.dumps(PERSON),
        }
        pieces, finish = [], None
        async with s.post(daemon.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            async for line in r.content:
                text = line.decode().strip()
                if not text.startswith("data: ") or text == "data: [DONE]":
                    continue
                choice = json.loads(text[6:])["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    assert finish == "stop" and len([p for p in pieces if p]) > 3
    jsonschema.validate(json.loads("".join(pieces)), PERSON)


async def test_unconstrained_rows_beside_constrained_ones_are_unchanged(daemon: Daemon) -> None:
    """A greedy unconstrained answer is the same alone and in a batch with three constrained rows."""
    plain = {"messages": [{"role": "user", "content": "Name three rivers."}], "temperature": 0, "max_tokens": 40}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    constrained = {"messages": ASK, "response_format": fmt, "temperature": 1.0, "n": 3, "max_tokens": 160}
    async with aiohttp.ClientSession() as s:
        alone = await post(s, daemon, "/v1/chat/completions", plain)
        together = await asyncio.gather(
            post(s, daemon, "/v1/chat/completions", constrained), post(s, daemon, "/v1/chat/completions", plain)
        )
    assert together[1]["choices"][0]["message"] == alone["choices"][0]["message"]
    for c in together[0]["choices"]:
        jsonschema.validate(json.loads(c["message"]["content"]), PERSON)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"$ref": "#/nowhere"}, "Pointer '/nowhere' does not exist"),
        ({"type": "object", "minProperties": 3, "maxProperties": 1}, "Unsatisfiable schema"),
        ({"type": "string", "pattern": "[a-"}, "regex parse error"),
        ({"type": "string", "format": "nonsense-format"}, "Unknown format"),
    ],
)
async def test_a_schema_the_engine_cannot_compile_is_a_400_before_anything_queues(
    daemon: Daemon, schema: dict[str, Any], why: str
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    async with aiohttp.ClientSession() as s:
        before = await generation(s, daemon)
        async with s.post(
            daemon.url + "/v1/chat/completions", json={"model": SMOLLM2, "messages": ASK, "response_format": fmt}
        ) as r:
            body = await r.json()
        after = await generation(s, daemon)
    assert r.status == 400 and body["error"]["param"] == "response_format", body
    assert "cannot be compiled" in body["error"]["message"] and why in body["error"]["message"]
    assert after["requests"] == before["requests"]
