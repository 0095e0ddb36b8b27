"""The routing policy and its pieces, without a network: the ``route`` knob, the plan each policy gives,
the token file, the error an upstream's answer becomes, the backoff of a dead upstream, the tokens an
answer passing through says were generated."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmosd.config import ConfigError, load_config
from llmosd.routing.policy import Candidate, Local, Plan, parse_routes, plan
from llmosd.routing.proxy import upstream_message
from llmosd.routing.upstreams import BACKOFF_S, Health, LanTokens, Upstream, openai_base, openai_name
from llmosd.routing.usage import LINE_BYTES, WHOLE_BYTES, Tally

HERE = Local(stored=True, loaded=True, load_s=0.0)
STORED = Local(stored=True, loaded=False, load_s=2.0)
ABSENT = Local(stored=False, loaded=False, load_s=0.0)
PEER = Candidate("lan:box-a", loaded=True, answer_s=0.3)
CLOUD = Candidate("upstream:openai", loaded=True, answer_s=0.8)


def test_the_route_knob_takes_a_default_and_per_model_policies() -> None:
    t = parse_routes("prefer-local, gpt-4o-mini=remote,smollm2=prefer-remote")
    assert (t.default, t.policy("gpt-4o-mini"), t.policy("smollm2"), t.policy("other")) == (
        "prefer-local",
        "remote",
        "prefer-remote",
        "prefer-local",
    )
    assert not parse_routes("local").routes_anything and parse_routes("local,x=remote").routes_anything
    for bad, why in (("nearby", "not a policy"), ("local,remote", "more than one default"), ("=remote", "names no")):
        with pytest.raises(ValueError, match=why):
            parse_routes(bad)


def test_a_bad_route_is_a_config_error_and_a_toml_table_works(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="route: 'sideways' is not a policy"):
        load_config(environ={"LLMOSD_ROUTE": "sideways"})
    toml = tmp_path / "config.toml"
    toml.write_text('[route]\ndefault = "prefer-local"\n"gpt-4o-mini" = "remote"\n')
    config = load_config({"config": str(toml)}, environ={})
    assert config.route == "prefer-local,gpt-4o-mini=remote" and config.routes.policy("gpt-4o-mini") == "remote"
    with pytest.raises(ConfigError, match="openai_upstream_url"):
        load_config(environ={"LLMOSD_OPENAI_UPSTREAM_URL": "api.openai.com"})


def test_each_policy_plans_its_order() -> None:
    assert plan("local", ABSENT, [PEER]) == Plan(("local",), "policy local")
    assert plan("remote", HERE, [PEER, CLOUD]).targets == ("lan:box-a", "upstream:openai")
    assert plan("remote", HERE, []).targets == ()  # nowhere: the api answers 503
    assert plan("prefer-remote", HERE, [CLOUD]).targets == ("upstream:openai", "local")
    assert plan("prefer-remote", ABSENT, []).targets == ("local",)  # the 404 comes from here
    assert plan("prefer-local", ABSENT, [PEER]).targets == ("lan:box-a",)
    loaded = plan("prefer-local", HERE, [PEER])
    assert loaded.targets == ("local", "lan:box-a") and loaded.overflow  # the peer only if the queue is full


def test_prefer_local_goes_away_while_a_load_would_take_longer_than_a_peer_answers() -> None:
    cold = plan("prefer-local", STORED, [CLOUD, PEER])
    assert cold.targets == ("lan:box-a", "local", "upstream:openai") and cold.load_here
    assert "a load takes ~2.0 s" in cold.reason
    quick = Local(stored=True, loaded=False, load_s=0.1)  # loading is faster than any peer answers
    assert plan("prefer-local", quick, [PEER]).targets == ("local", "lan:box-a")
    stored_only = Candidate("lan:box-c", loaded=False, answer_s=0.1)  # it would load it too
    assert plan("prefer-local", STORED, [stored_only]).targets == ("local", "lan:box-c")


def test_the_lan_token_file_names_a_site_token_or_one_per_peer(tmp_path: Path) -> None:
    assert LanTokens.read(None, "own").for_peer("x", "id") == "own"
    f = tmp_path / "tokens"
    f.write_text("# site\nsite-token\nkitchen box (2) kitchen-token\n0123abcd id-token\n")
    t = LanTokens.read(f, "own")
    assert t.for_peer("kitchen box (2)", "zz") == "kitchen-token"
    assert t.for_peer("other", "0123abcd") == "id-token"
    assert t.for_peer("other", "zz") == "site-token"
    assert "site-token" not in repr(t) and "kitchen-token" not in repr(t)
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        LanTokens.read(f, "own")


def test_an_upstreams_error_keeps_its_4xx_and_its_own_trouble_is_a_502() -> None:
    body = b'{"error":{"code":400,"message":"Expected \'messages\' to be an array","type":"invalid_request_error"}}'
    assert upstream_message(400, body, "upstream:llama") == (
        400,
        "upstream:llama: Expected 'messages' to be an array",
        "invalid_request_error",
    )
    status, message, kind = upstream_message(401, b'{"error":{"message":"Invalid API Key"}}', "upstream:x")
    assert (status, kind) == (502, "upstream_error") and "refused llmosd's credentials (401)" in message
    assert upstream_message(500, b"<html>oops\n\x1b[31m</html>", "lan:a")[:2] == (
        502,
        "lan:a failed (500): <html>oops  [31m</html>",
    )
    assert upstream_message(404, b'{"error": "model not found"}', "lan:a")[1] == "lan:a: model not found"


def test_a_dead_upstream_is_probed_after_a_growing_wait() -> None:
    h = Health()
    assert h.due(5.0) and not h.up
    waits = []
    for _ in range(len(BACKOFF_S) + 2):
        h.failed("refused")
        waits.append(round(h.retry_at - h.checked, 3))
        assert not h.due(5.0)
    assert waits == [*BACKOFF_S, BACKOFF_S[-1], BACKOFF_S[-1]]
    h.ok()
    assert h.up and h.failures == 0 and not h.due(5.0)


def test_an_upstream_never_shows_its_secret() -> None:
    u = Upstream("openai", "api.openai.com", "https://api.openai.com/v1", "sk-secret")
    assert "sk-secret" not in repr(u) and "sk-secret" not in str(u.describe())
    assert u.url("/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert openai_base("http://gpu-box:8000") == "http://gpu-box:8000/v1"
    assert openai_name("https://user:pw@api.example.com/v1") == "api.example.com"


def tally(content_type: str, *chunks: bytes) -> int:
    t = Tally()
    t.begin(content_type)
    for c in chunks:
        t.feed(c)
    t.close()
    return t.completion_tokens


def test_a_forwarded_answer_is_counted_by_its_usage_else_by_its_events() -> None:
    whole = b'{"choices": [{"message": {"content": "Blue."}}], "usage": {"completion_tokens": 3}}'
    assert tally("application/json", whole[:20], whole[20:]) == 3
    assert tally("application/json", b'{"choices": []}') == 0  # no usage: nothing is guessed
    assert tally("application/json", b"x" * (WHOLE_BYTES + 1)) == 0
    events = [
        b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n',  # no text: not a token
        b'data: {"choices": [{"delta": {"content": "Bl"}}]}\n\n',
        b'data: {"choices": [{"delta": {"content": "ue"}}]}\r\n\r\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]}\n\n',
        b'data: {"choices": [{"text": "."}]}\n\n',  # /v1/completions
        b": keep-alive\n\ndata: [DONE]\n\n",
    ]
    stream = b"".join(events)
    assert tally("text/event-stream; charset=utf-8", *events) == 4
    assert tally("text/event-stream", *(stream[i : i + 7] for i in range(0, len(stream), 7))) == 4  # cut anywhere
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 9}}\n\n'
    assert tally("text/event-stream", stream[:-14], usage, b"data: [DONE]\n\n") == 9  # its own count wins
    assert tally("text/event-stream", events[1], events[2].rstrip()) == 2  # a last line without its newline
    # a line held past LINE_BYTES before its newline is dropped, not kept growing; the next one counts
    long = b'data: {"choices": [{"delta": {"content": "' + b"x" * 2 * LINE_BYTES + b'"}}]}\n\n'
    cut = 3 * LINE_BYTES // 4
    assert tally("text/event-stream", long[:cut], long[cut : 2 * cut], long[2 * cut :], events[1]) == 1
