"""Models that think before they answer (issue 34, points 2 and 3): the reasoning format found at export
from the template and the tokens, the thinking returned in ``reasoning_content`` (whole and streamed), turned
off (``reasoning_effort: "none"`` / ``chat_template_kwargs``), bounded (``max_reasoning_tokens``), and a
JSON schema that constrains the answer, not the thinking.

Two tiny random-weight Llamas with SmolLM2's tokenizer (byte-level BPE, as the grammar engine needs)
and ``<think>`` / ``</think>`` added as tokens (as Qwen3's are): one with Qwen3's hybrid template
(``enable_thinking``; the model opens the block itself), one with the template of Qwen3's Thinking-2507
and the R1 distills (the generation prompt opens it). A random model says nothing sensible, so the tests
check the protocol: which tokens go where, and how many.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmosd.runtime.reasoning import Harmony, ReasoningFormat, from_dict
from tests.conftest import TINY_LLAMA, Daemon, export, http_json, smollm2_gguf, start_daemon

VOCAB = 49152  # SmolLM2's; the two tags take the next ids
THINK, END = VOCAB, VOCAB + 1

_TURNS = (
    "{%- if messages[0].role == 'assistant' %}"
    "{{ raise_exception('Conversations must start with a user or system message') }}{%- endif %}"
    "{%- if documents %}{{- '<|im_start|>system\\nDocuments:\\n' }}"
    "{%- for d in documents %}{{- d.title ~ ': ' ~ d.text ~ '\\n' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\\n' ~ message.reasoning_content ~ '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content ~ '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
)
# Qwen3's: thinking unless enable_thinking is false, which writes an empty block.
HYBRID = (
    _TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Qwen3-*-Thinking-2507's and the R1 distills': the prompt opens the block; nothing turns it off.
OPENING = _TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"


# gpt-oss's harmony (its real template is far longer): system, developer and user messages, and an assistant
# turn the generation prompt opens in the analysis channel (as a client may prefill it), so that a random model
# starts thinking; reasoning_effort reaches the system message, as gpt-oss's template puts it there.
HARMONY_TEMPLATE = (
    "{%- if reasoning_effort %}{{- '<|start|>system<|message|>Reasoning: ' ~ reasoning_effort ~ '<|end|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' ~ message.content ~ '<|end|>' }}"
    "{%- else %}{{- '<|start|>' ~ message.role ~ '<|message|>' ~ message.content ~ '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant<|channel|>analysis<|message|>' }}{%- endif %}"
)
THINK_TAGS = ("<think>", "</think>")
HARMONY_TAGS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")


def checkpoint(dst: Path, template: str, tokenizer: Path, tags: tuple[str, ...] = THINK_TAGS) -> Path:
    import shutil

    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {
        "vocab_size": VOCAB + len(HARMONY_TAGS),
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config = LlamaConfig(**(TINY_LLAMA | shape))
    LlamaForCausalLM(config).eval().save_pretrained(dst)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, dst / name)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    if tags == THINK_TAGS:  # as Qwen3's: added, not special (a tag is a token; text spelling one stays text)
        tok.add_tokens([AddedToken(t, normalized=False) for t in tags])
        assert (tok.token_to_id("<think>"), tok.token_to_id("</think>")) == (THINK, END)
    else:  # as gpt-oss's: special tokens
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tags])
    tok.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    return dst


@pytest.fixture(scope="module")
def thinking_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Both models exported fp32 into one store, served by one daemon."""
    from transformers import AutoTokenizer

    state = tmp_path_factory.mktemp("reasoning")
    gguf = smollm2_gguf()
    tokenizer = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tokenizer)
    templates = {
        "hybrid": (HYBRID, THINK_TAGS),
        "opening": (OPENING, THINK_TAGS),
        "harmony": (HARMONY_TEMPLATE, HARMONY_TAGS),
    }
    sources = {name: checkpoint(tmp_path_factory.mktemp(name), t[0], tokenizer, t[1]) for name, t in templates.items()}

    def run(name: str) -> tuple[str, int, str]:
        r = export(sources[name], "text-generation", "fp32", name, state)
        return name, r.returncode, r.stderr[-3000:]

    with ThreadPoolExecutor(2) as pool:
        for name, code, err in pool.map(run, sources):
            assert code == 0, (name, err)
    quiet = {"LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_MDNS": "false"}  # these models only
    d = start_daemon(state, tmp_path_factory.mktemp("reasoning-run"), env=quiet)
    yield d
    d.stop()


class Answer:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code, self.body = status, body

    def json(self) -> Any:
        return self.body

    @property
    def text(self) -> str:
        return json.dumps(self.body)


def _request(d: Daemon, path: str, body: dict[str, Any]) -> urllib.request.Request:
    headers = {"Authorization": f"Bearer {d.token}", "Content-Type": "application/json"}
    return urllib.request.Request(f"{d.url}{path}", data=json.dumps(body).encode(), headers=headers)


QUESTION = [{"role": "user", "content": "How many legs has a cat?"}]


def _chat(d: Daemon, model: str, **extra: Any) -> Answer:
    body = {"model": model, "messages": QUESTION, "temperature": 0} | extra
    return Answer(*http_json(d, "/v1/chat/completions", body, timeout=120))


def _streamed(d: Daemon, model: str, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": model, "messages": QUESTION, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}} | extra
    events = []
    with urllib.request.urlopen(_request(d, "/v1/chat/completions", body), timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_the_export_records_how_a_model_thinks(thinking_daemon: Daemon) -> None:
    """The manifest's word, from the template and the tokens: the hybrid template's toggle is found, the
    opening one has none."""
    for name, toggle in (("hybrid", "enable_thinking"), ("opening", None)):
        manifest = http_json(thinking_daemon, f"/api/models/{name}")[1]
        runtime = manifest.get("runtime") or manifest["manifest"]["runtime"]
        assert runtime["reasoning"] == {
            "format": "think-tags",
            "start": "<think>",
            "end": "</think>",
            "start_id": THINK,
            "end_id": END,
            "toggle": toggle,
        }


def test_thinking_is_returned_apart_from_the_answer_and_bounded(thinking_daemon: Daemon) -> None:
    """The opening template starts the answer inside the block: three thinking tokens (the budget), the end
    tag llmosd writes then, and the answer; streamed, the same text in the same places."""
    r = _chat(thinking_daemon, "opening", max_tokens=10, max_reasoning_tokens=3)
    assert r.status_code == 200, r.text
    out = r.json()
    said, usage = out["choices"][0]["message"], out["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert usage["completion_tokens"] == 10 and out["choices"][0]["finish_reason"] == "length"
    assert said["reasoning_content"] and said["content"]
    assert "think>" not in said["content"] and "think>" not in said["reasoning_content"]

    events = _streamed(thinking_daemon, "opening", max_tokens=10, max_reasoning_tokens=3)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    thought = "".join(d.get("reasoning_content") or "" for d in deltas)
    answer = "".join(d.get("content") or "" for d in deltas)
    assert (thought, answer) == (said["reasoning_content"], said["content"])
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all(not d.get("reasoning_content") for d in deltas[first_answer:])  # thinking comes first
    assert deltas[0]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_a_schema_constrains_the_answer_not_the_thinking(thinking_daemon: Daemon) -> None:
    """Greedy thinking is the same token for token with a JSON schema as without one; the answer after it
    is JSON that follows the schema."""
    schema = {
        "type": "object",
        "properties": {"legs": {"enum": [2, 4, 6, 8]}},  # a random model would write digits to max_tokens
        "required": ["legs"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "legs", "schema": schema}}
    free = _chat(thinking_daemon, "opening", max_tokens=8, max_reasoning_tokens=5).json()
    r = _chat(thinking_daemon, "opening", max_tokens=60, max_reasoning_tokens=5, response_format=fmt)
    assert r.status_code == 200, r.text
    said = r.json()["choices"][0]["message"]
    assert said["reasoning_content"] == free["choices"][0]["message"]["reasoning_content"]
    answer = json.loads(said["content"])
    assert set(answer) == {"legs"} and answer["legs"] in (2, 4, 6, 8)


def test_harmony_channels_are_split_bounded_and_turned_off(thinking_daemon: Daemon) -> None:
    """gpt-oss's format: the analysis message is the thinking, the final message the answer, the headers
    between them shown nowhere. A spent budget is closed by llmosd (``<|end|><|start|>assistant<|channel|>
    final<|message|>``, its tokens counted as completion tokens); a schema constrains the final message;
    ``reasoning_effort: "none"`` ends the analysis the prompt opened; ``"high"`` reaches the template."""
    runtime = http_json(thinking_daemon, "/api/models/harmony")[1]
    assert (runtime.get("runtime") or runtime["manifest"]["runtime"])["reasoning"]["format"] == "harmony"
    out = _chat(thinking_daemon, "harmony", max_tokens=16, max_reasoning_tokens=3).json()
    said, usage = out["choices"][0]["message"], out["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3} and usage["completion_tokens"] == 16
    assert said["reasoning_content"] and said["content"] and "<|" not in said["content"] + said["reasoning_content"]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": [1, 2, 3]}}}
    r = _chat(thinking_daemon, "harmony", max_tokens=40, max_reasoning_tokens=3, response_format=fmt)
    assert r.status_code == 200, r.text
    constrained = r.json()["choices"][0]["message"]
    assert constrained["reasoning_content"] == said["reasoning_content"] and json.loads(constrained["content"]) in (
        1,
        2,
        3,
    )
    off = _chat(thinking_daemon, "harmony", max_tokens=4, reasoning_effort="none").json()
    # the analysis the prompt opened is closed in the prompt: <|end|><|start|>assistant<|channel|>final<|message|>
    assert off["usage"]["prompt_tokens"] - usage["prompt_tokens"] >= 6
    assert "reasoning_content" not in off["choices"][0]["message"] and off["choices"][0]["message"]["content"]
    high = _chat(thinking_daemon, "harmony", max_tokens=1, reasoning_effort="high").json()
    assert high["usage"]["prompt_tokens"] > usage["prompt_tokens"] + 3  # the system message with its effort


def test_thinking_turned_off(thinking_daemon: Daemon) -> None:
    """``chat_template_kwargs`` sets the hybrid template's toggle (its empty block: four more prompt tokens,
    ``<think>``, a blank line, ``</think>``, a blank line), ``reasoning_effort: "none"`` does the same; the
    opening template, which has no toggle, gets its block closed by llmosd (``</think>`` and a blank line).
    Off, there is no thinking to return."""
    on = _chat(thinking_daemon, "hybrid", max_tokens=4).json()
    off = _chat(thinking_daemon, "hybrid", max_tokens=4, chat_template_kwargs={"enable_thinking": False}).json()
    none = _chat(thinking_daemon, "hybrid", max_tokens=4, reasoning_effort="none").json()
    assert off["usage"]["prompt_tokens"] == on["usage"]["prompt_tokens"] + 4
    assert none["usage"] == off["usage"] and none["choices"] == off["choices"]
    assert "reasoning_content" not in off["choices"][0]["message"]
    assert "reasoning_content" in on["choices"][0]["message"]  # on: the field is there, thinking or not

    opened = _chat(thinking_daemon, "opening", max_tokens=4).json()
    closed = _chat(thinking_daemon, "opening", max_tokens=4, reasoning_effort="none").json()
    assert closed["usage"]["prompt_tokens"] == opened["usage"]["prompt_tokens"] + 2
    assert "reasoning_content" not in closed["choices"][0]["message"]
    assert closed["choices"][0]["message"]["content"]


def test_template_variables_reach_the_template(thinking_daemon: Daemon) -> None:
    """``documents`` (top level, as vLLM takes it) is rendered by the template; an assistant's
    ``reasoning_content`` passed back reaches it too; what the template raises is a 400 with its words."""
    plain = _chat(thinking_daemon, "hybrid", max_tokens=1).json()["usage"]["prompt_tokens"]
    docs = [{"title": "cats", "text": "a cat has four legs"}]
    with_docs = _chat(thinking_daemon, "hybrid", max_tokens=1, documents=docs).json()["usage"]["prompt_tokens"]
    assert with_docs > plain + 8
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "the user greets me"},
        {"role": "user", "content": "How many legs has a cat?"},
    ]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, turns[2]]
    n = [
        _chat(thinking_daemon, "hybrid", max_tokens=1, messages=m).json()["usage"]["prompt_tokens"]
        for m in (turns, short)
    ]
    assert n[0] > n[1] + 4  # the thinking passed back was rendered
    r = _chat(thinking_daemon, "hybrid", messages=[{"role": "assistant", "content": "hi"}])
    assert r.status_code == 400
    assert "Conversations must start with a user or system message" in r.json()["error"]["message"]


def test_the_prompt_ends_as_asked(thinking_daemon: Daemon) -> None:
    """vLLM's ``add_generation_prompt`` (false: no assistant turn opened: four tokens fewer here) and
    ``continue_final_message`` (the prompt ends inside the final message, which the answer continues: its
    end-of-turn and newline tokens are cut)."""
    turns = [QUESTION[0], {"role": "assistant", "content": "A cat has"}]

    def prompt_tokens(**extra: Any) -> int:
        r = _chat(thinking_daemon, "hybrid", max_tokens=1, **extra)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens"])

    assert prompt_tokens(add_generation_prompt=False) == prompt_tokens() - 4
    closed = prompt_tokens(messages=turns, add_generation_prompt=False)
    assert prompt_tokens(messages=turns, add_generation_prompt=False, continue_final_message=True) == closed - 2
    r = _chat(thinking_daemon, "hybrid", messages=turns, continue_final_message=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"include_reasoning": "yes"}, "include_reasoning"),
        ({"documents": "cats"}, "documents"),
        ({"add_generation_prompt": 1}, "add_generation_prompt"),
    ],
)
def test_bad_thinking_fields_are_refused(thinking_daemon: Daemon, extra: dict[str, Any], param: str) -> None:
    r = _chat(thinking_daemon, "hybrid", max_tokens=1, **extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_include_reasoning_false_leaves_the_thinking_out(thinking_daemon: Daemon) -> None:
    both = _chat(thinking_daemon, "opening", max_tokens=6, max_reasoning_tokens=2).json()
    bare = _chat(thinking_daemon, "opening", max_tokens=6, max_reasoning_tokens=2, include_reasoning=False).json()
    assert "reasoning_content" not in bare["choices"][0]["message"]
    assert bare["choices"][0]["message"]["content"] == both["choices"][0]["message"]["content"]


# The state machine alone: token ids in, their class out (no model needed).
FMT = ReasoningFormat("<think>", "</think>", THINK, END, "enable_thinking")


def test_a_model_that_opens_its_own_block() -> None:
    t = FMT.plan([1, 2], budget=2).tracker()
    assert t.also_allowed() == (THINK,) and t.forced() is None and t.answering
    assert [t.take(x) for x in (THINK, 5, 6)] == ["tag", "think", "think"]
    assert not t.answering and t.forced() == END  # the budget is spent: the end tag comes next
    assert [t.take(x) for x in (END, 7, THINK, END)] == ["close", "answer", "answer", "answer"]
    assert t.tokens == 2 and t.answering and t.also_allowed() == ()


def test_an_answer_that_begins_without_thinking_stays_an_answer() -> None:
    t = FMT.plan([1], budget=None).tracker()
    assert [t.take(x) for x in (5, THINK, 6)] == ["answer", "answer", "answer"]
    assert t.tokens == 0 and t.forced() is None and not t.entered


def test_a_prompt_that_opens_the_block() -> None:
    assert FMT.opened_by([1, 2, THINK, 3]) and not FMT.opened_by([THINK, END, 3]) and not FMT.opened_by([1, 2])
    t = FMT.plan([1, 2, THINK, 3], budget=None).tracker()
    assert t.also_allowed() == () and not t.answering
    assert [t.take(x) for x in (5, THINK, END, 6)] == ["think", "think", "close", "answer"]
    assert FMT.turned_off([1, THINK], lambda text: [99]) == [99] and FMT.turned_off([1], lambda text: [99]) == []


# gpt-oss's harmony: tags and the words of its headers as token ids (any ids will do here)
START, CHANNEL, MESSAGE, END_H, ASSISTANT, ANALYSIS, FINAL, COMMENTARY = 200, 201, 202, 203, 10, 11, 12, 13
HARMONY = Harmony(START, CHANNEL, MESSAGE, END_H, (ASSISTANT,), (ANALYSIS,), (FINAL,))


def test_harmony_splits_the_analysis_channel_from_the_final_one() -> None:
    """The prompt ends ``<|start|>assistant``: headers are never shown, the analysis message is the
    thinking (twice here, as gpt-oss may), the final message the answer; a grammar waits for it."""
    prompt = [1, START, ASSISTANT]
    assert HARMONY.state_after(prompt) == ("header", None)
    t = HARMONY.plan(prompt, budget=None).tracker()
    out = [
        t.take(x) for x in (CHANNEL, ANALYSIS, MESSAGE, 5, 6, END_H, START, ASSISTANT, CHANNEL, ANALYSIS, MESSAGE, 7)
    ]
    assert out == ["tag", "tag", "tag", "think", "think", "close", "tag", "tag", "tag", "tag", "tag", "think"]
    assert not t.answering and t.tokens == 3
    out = [t.take(x) for x in (END_H, START, ASSISTANT, CHANNEL, FINAL, MESSAGE)]
    assert out == ["close", "tag", "tag", "tag", "tag", "tag"] and t.answering
    assert [t.take(x) for x in (8, 9)] == ["answer", "answer"]
    comment = HARMONY.plan(prompt, budget=None).tracker()  # a preamble or a tool call: commentary is answer text
    assert [comment.take(x) for x in (CHANNEL, COMMENTARY, MESSAGE, 5)] == ["tag", "tag", "tag", "answer"]


def test_harmony_thinking_is_bounded_and_turned_off() -> None:
    """A spent budget closes the analysis message and opens the final one, a token a step; thinking off
    opens the final channel in the prompt itself."""
    opened = [START, ASSISTANT, CHANNEL, ANALYSIS, MESSAGE]
    assert HARMONY.state_after(opened) == ("message", "analysis")
    t = HARMONY.plan(opened, budget=1).tracker()
    assert t.take(5) == "think"
    forced = []
    while (x := t.forced()) is not None:
        forced.append(x)
        t.take(x)
    assert forced == [END_H, START, ASSISTANT, CHANNEL, FINAL, MESSAGE] and t.answering
    assert HARMONY.turned_off([1, START, ASSISTANT], lambda text: []) == [CHANNEL, FINAL, MESSAGE]
    assert HARMONY.turned_off(opened, lambda text: []) == HARMONY.closing()
    assert from_dict(HARMONY.as_dict()) == HARMONY and from_dict(FMT.as_dict()) == FMT


def test_a_list_of_named_templates_gives_the_default(tmp_path: Path) -> None:
    """Hermes' and Command-R's tokenizer_config.json name several templates: the default one is rendered,
    as transformers takes it when no tools are sent; a template that names no think tags does not reason."""
    from llmosd.tasks.contract import Source
    from llmosd.tasks.generation import generation_settings

    named = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": "{{ messages }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    settings = generation_settings(Source(tmp_path, {}, []))
    assert settings["chat_template"] == "{{ messages }}" and settings["reasoning"] is None


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SmolLM2's byte-level BPE with gpt-oss's tags as special tokens (its own tokenizer is not on this box)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    gguf, folder = smollm2_gguf(), tmp_path_factory.mktemp("harmony-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tags = (*HARMONY_TAGS, "<|call|>", "<|constrain|>")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tags])
    return tok


def _reply(tok: Any, prompt: str, said: str, max_tokens: int = 64) -> tuple[str, str, str | None, list[str]]:
    """``said`` (gpt-oss's reply after ``prompt``), sampled token by token through a sequence as the engine
    samples it (greedy over logits that favour each token in turn), the model's ends being ``<|return|>``
    and ``<|call|>`` as in gpt-oss's generation config: the answer's text, the thinking, the finish reason,
    and the answer's text chunk by chunk."""
    import numpy as np

    from llmosd.runtime.reasoning import detect
    from llmosd.runtime.sampling import SamplingParams
    from llmosd.scheduler.generation import GenerationRequest, GenerationStream, sequence

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    fmt = detect("<|channel|>", tok.token_to_id, frozenset(), ids)
    assert isinstance(fmt, Harmony) and fmt.call_id == tok.token_to_id("<|call|>")
    prompt_ids = ids(prompt)
    request = GenerationRequest(tuple(prompt_ids), SamplingParams(temperature=0), max_tokens)
    request = dataclasses.replace(request, thinking=fmt.plan(prompt_ids, None))
    seq = sequence(request, GenerationStream(len(prompt_ids)), tok, tok.get_vocab_size(), len(prompt_ids) + max_tokens)
    eos = frozenset({tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")})
    text, thought, finish, chunks = "", "", None, []
    for token in ids(said):
        logits = np.zeros(tok.get_vocab_size(), dtype=np.float32)
        logits[token] = 1.0
        chunk = seq.advance(logits, eos)
        if chunk is not None:
            text, thought, finish = text + chunk.text, thought + chunk.reasoning, chunk.finish_reason
            chunks.append(chunk.text)
        if seq.done:
            break
    return text, thought, finish, chunks


CALL = '{"city": "Paris", "unit": "celsius"}'


@pytest.mark.parametrize(
    "said",
    [
        # the recipient after the channel, as gpt-oss writes it most often; thinking first
        "<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant<|channel|>commentary"
        f" to=functions.get_weather <|constrain|>json<|message|>{CALL}<|call|>",
        # or before it
        f" to=functions.get_weather<|channel|>commentary json<|message|>{CALL}<|call|>",
    ],
)
def test_a_harmony_tool_call_is_read_back_into_tool_calls(harmony_tokenizer: Any, said: str) -> None:
    """gpt-oss calls a tool in a message addressed to it (``to=functions.NAME`` in the header, the arguments
    its body, ``<|call|>`` its end). Its tokens through a sequence reach the API's reader as any model's
    calls do, and come back as ``tool_calls``: the name, the arguments, the thinking apart, no header shown,
    whole and streamed."""
    from llmosd.api.chat_answers import Deltas, message

    text, thought, finish, chunks = _reply(
        harmony_tokenizer, "<|start|>user<|message|>Paris?<|end|><|start|>assistant", said
    )
    assert (
        finish == "stop"
        and "to=" not in text
        and "<|" not in text.replace("<tool_call>", "").replace("</tool_call>", "")
    )
    names = frozenset({"get_weather"})
    said_msg, reason = message(text, finish, names, thought)
    assert reason == "tool_calls" and said_msg["content"] is None, said_msg
    (call,) = said_msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == json.loads(CALL)
    assert said_msg["reasoning_content"] == ("The user wants the weather." if "analysis" in said else None)
    deltas = Deltas(names)
    streamed = [d for i, c in enumerate(chunks) for d in deltas(c, finish if i == len(chunks) - 1 else None, None)]
    calls = [d[0]["tool_calls"][0] for d in streamed if "tool_calls" in d[0]]
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and streamed[-1][1] == "tool_calls"
    assert all(not d[0].get("content") for d in streamed)


def test_harmony_messages_that_call_nothing_stay_text(harmony_tokenizer: Any) -> None:
    """A final message is the answer; a call to a function the request did not offer is text, as any
    model's; a call cut short by max_tokens is its arguments as text, finish ``length``."""
    from llmosd.api.chat_answers import message

    prompt = "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    text, _, finish, _ = _reply(harmony_tokenizer, prompt, "<|channel|>final<|message|>Hello there.<|return|>")
    assert (text, finish) == ("Hello there.", "stop")
    text, _, finish, _ = _reply(
        harmony_tokenizer, prompt, " to=functions.get_time<|channel|>commentary<|message|>{}<|call|>"
    )
    said, reason = message(text, finish, frozenset({"get_weather"}), None)
    assert reason == "stop" and "get_time" in said["content"] and "tool_calls" not in said
    cut = f" to=functions.get_weather<|channel|>commentary<|message|>{CALL}<|call|>"
    text, _, finish, _ = _reply(harmony_tokenizer, prompt, cut, max_tokens=12)
    assert finish == "length" and "<tool_call>" not in text and text and CALL.startswith(text), text
