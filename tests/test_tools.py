"""Tool calling: a round trip through the official openai SDK against the real daemon serving SmolLM2
int4 (the model calls a function, the client answers with a ``tool`` message, the model answers),
streamed and not; ``required`` and a named function enforced by the grammar; and the parts that read
calls back, on their own."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from llmosd.runtime.chat import ChatTemplate, Message
from llmosd.runtime.tools import Tool, ToolCall, ToolCallStream, parse_tool_calls
from tests.conftest import SMOLLM2, Daemon

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def client(daemon: Daemon) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed-on-loopback")


def _called(c: Any, stream: bool, **kw: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """The assistant's finish reason and calls, from one answer or from its stream's deltas."""
    if not stream:
        choice = c.chat.completions.create(model=SMOLLM2, **kw).choices[0]
        calls = [t.model_dump() for t in choice.message.tool_calls or []]
        return choice.finish_reason, calls
    finish, calls = None, []
    for chunk in c.chat.completions.create(model=SMOLLM2, stream=True, **kw):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for t in chunk.choices[0].delta.tool_calls or []:  # one delta a call, with its index
            assert t.index == len(calls) and t.function
            calls.append({"id": t.id, "type": "function", "function": t.function.model_dump()})
    return finish, calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_round_trip_through_the_openai_sdk(daemon: Daemon, stream: bool) -> None:
    """The model calls get_weather (tool_choice required: SmolLM2-135M would not choose to), the client
    answers with a tool message, and the model answers in words from it."""
    c = client(daemon)
    finish, calls = _called(c, stream, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    assert finish == "tool_calls" and calls, calls
    assert all(call["id"].startswith("call_") and call["type"] == "function" for call in calls)
    weather = [call for call in calls if call["function"]["name"] == "get_weather"]
    assert weather, calls
    jsonschema.validate(json.loads(weather[0]["function"]["arguments"]), WEATHER)
    answers = [
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"sky": "clear", "temperature_c": 21})}
        for call in calls
    ]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *answers]
    body = {"messages": history, "tools": TOOLS, "tool_choice": "none", "temperature": 0, "max_tokens": 60}
    if stream:
        chunks = list(c.chat.completions.create(model=SMOLLM2, stream=True, **body))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        reply = c.chat.completions.create(model=SMOLLM2, **body).choices[0]
        text, reason = reply.message.content or "", reply.finish_reason
        assert not reply.message.tool_calls
    assert reason in ("stop", "length") and "21" in text, text


def test_a_named_function_streams_as_tool_call_deltas(daemon: Daemon) -> None:
    """Streamed, the call arrives as OpenAI's tool_calls deltas the SDK accumulates; the named function
    is the one called, with arguments that match its parameters, at temperature 1."""
    c = client(daemon)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        chunks = list(
            c.chat.completions.create(
                model=SMOLLM2,
                messages=ASK,
                tools=TOOLS,
                tool_choice=named,
                temperature=1.0,
                seed=seed,
                max_tokens=80,
                stream=True,
            )
        )
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert deltas[0].role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        calls = [t for d in deltas for t in d.tool_calls or []]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].function and calls[0].id
        assert calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(calls[0].function.arguments or ""), WEATHER)
        assert not "".join(d.content or "" for d in deltas).strip()  # only the call, no text


def test_auto_reads_back_whatever_calls_the_model_writes(daemon: Daemon) -> None:
    """With tool_choice auto the model chooses. SmolLM2-135M answers in words (it was not trained to call
    tools: greedy, it never chose to on these prompts), and that stays content. Its call is read back
    when it writes one: here a regex (vLLM's guided_regex) makes it write one, streamed and not."""
    c = client(daemon)
    plain = c.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Say hello in French."}],
        tools=TOOLS,
        temperature=0,
        max_tokens=40,
    )
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
    forced = r'<tool_call>\[\{"name": "get_time", "arguments": \{"city": "(Paris|Lyon)"\}\}\]</tool_call>'
    whole = c.chat.completions.create(
        model=SMOLLM2, messages=ASK, tools=TOOLS, max_tokens=80, extra_body={"guided_regex": forced}
    )
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    (call,) = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["city"] in ("Paris", "Lyon")
    chunks = list(
        c.chat.completions.create(
            model=SMOLLM2, messages=ASK, tools=TOOLS, max_tokens=80, stream=True, extra_body={"guided_regex": forced}
        )
    )
    calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    assert [t.function.name for t in calls if t.function] == ["get_time"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


NAMES = frozenset({"get_weather", "get_time"})


@pytest.mark.parametrize(
    ("text", "content", "called"),
    [
        ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>', "", ["get_weather"]),
        (
            'Let me look.\n<tool_call>{"name": "get_time", "arguments": {"city": "Rome"}}</tool_call>',
            "Let me look.",
            ["get_time"],
        ),
        (
            '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}}]</tool_call>',
            "",
            ["get_time", "get_weather"],
        ),
        ('<tool_call>[{"name": "launch_rockets", "arguments": {}}]</tool_call>', None, []),  # not a tool offered
        ('<tool_call>[{"name": "get_time", "arguments": {}</tool_call>', None, []),  # malformed
        ("Plain words, no call.", None, []),
    ],
)
def test_calls_are_read_back_or_left_as_content(text: str, content: str | None, called: list[str]) -> None:
    said, calls = parse_tool_calls(text, NAMES)
    assert [c.name for c in calls] == called
    assert said == (text if content is None else content)
    stream = ToolCallStream(NAMES)
    released = "".join(stream.push(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, streamed = stream.finish()
    assert [c.name for c in streamed] == called
    if called:  # the content before the call went out as it came; the call is not content
        assert rest == "" and released.rstrip() == said
    else:
        assert released + rest == text


def test_the_stream_never_releases_the_start_of_a_tag() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.push("Sure <tool") == "Sure "
    assert stream.push("ing is fun") == "<tooling is fun"  # it was not a tag after all
    assert stream.finish() == ("", [])


def test_a_template_without_tools_gets_the_generic_prompt_and_the_calls_written_back() -> None:
    template = ChatTemplate(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert not template.takes_tools
    call = ToolCall("call_1", "get_time", '{"city": "Rome"}')
    text = template.render(
        [
            Message("user", "Time in Rome?"),
            Message("assistant", "", (call,)),
            Message("tool", "14:05", tool_call_id="call_1"),
        ],
        [Tool("get_time", "The local time", {"type": "object"})],
    )
    assert text.startswith("<|system|>You are an expert in composing functions.") and '"name": "get_time"' in text
    assert '<|assistant|><tool_call>[{"name": "get_time", "arguments": {"city": "Rome"}}]</tool_call>' in text
    assert "<|user|><tool_response>\n14:05\n</tool_response>" in text
    own = ChatTemplate("{{ tools | tojson }}{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}")
    assert own.takes_tools
    rendered = own.render([Message("assistant", "", (call,))], [Tool("get_time")])
    assert '"name": "get_time"' in rendered and '"arguments": {"city": "Rome"}' in rendered
