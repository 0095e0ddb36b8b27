"""The console at ``GET /`` in a real browser: Debian's chromium, driven by Playwright for Python through
``executable_path`` (Playwright cannot download its own browsers here, and needs none).

From the LAN (a network namespace, over TLS pinned by the certificate's key, at phone width) the page
asks for a token, keeps it in session storage, draws its charts from live data, embeds a text and streams
a chat; it makes no request to any host but the daemon. On loopback it asks for nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEFAULT, SMOLLM2, Daemon, exported, llmosd, start_daemon, store_with
from tests.netns import HOST_ADDR, NS_ADDR

LAUNCH = textwrap.dedent(
    """
    import base64, json, sys, time
    from playwright.sync_api import sync_playwright

    def browser(p, chromium, spki=""):
        args = ["--no-sandbox"]  # root in a container: chromium's sandbox needs user namespaces
        if spki:  # trust this one key (the SPKI pin the daemon reports), as a pinned client does
            args.append("--ignore-certificate-errors-spki-list=" + base64.b64encode(bytes.fromhex(spki)).decode())
        return p.chromium.launch(executable_path=chromium, args=args)

    def watch(context, page):
        seen, problems = [], []
        context.on("request", lambda r: seen.append(r.url))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append("page error: " + str(e)))
        return seen, problems

    def charts(page):
        return page.evaluate(
            "() => Object.fromEntries([...document.querySelectorAll('.chart')].map(c => [c.id, "
            "{samples: +(c.dataset.samples || 0), peak: +(c.dataset.peak || 0), canvas: !!c.querySelector('canvas')}]))"
        )
    """
)

LAN_DRIVER = LAUNCH + textwrap.dedent(
    """
    import ssl, urllib.request, urllib.error
    url, spki, token, cafile, out, chromium = sys.argv[1:7]
    got = {}

    def plain(path):  # no token: what a Prometheus in the scrape range, or anyone, gets
        tls = ssl.create_default_context(cafile=cafile)
        try:
            with urllib.request.urlopen(url + path, timeout=10, context=tls) as r:
                return r.status, r.read().decode()[:20000]
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    got["metrics"] = plain("/metrics")
    got["stats_without_token"] = plain("/api/stats")[0]
    got["page_without_token"] = plain("/")[0]

    with sync_playwright() as p:
        b = browser(p, chromium, spki)
        context = b.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = context.new_page()
        seen, problems = watch(context, page)
        page.goto(url + "/")
        page.wait_for_selector("#login:not([hidden])", timeout=20000)
        got["main_hidden"] = page.is_hidden("#main")
        page.fill("#token", "not-a-token-of-this-box-0123456789")
        page.click("#login button")
        page.wait_for_function("() => document.getElementById('login-error').textContent.length > 0")
        got["wrong"] = page.text_content("#login-error")
        page.fill("#token", token)
        page.click("#login button")
        page.wait_for_selector("#main:not([hidden])", timeout=20000)
        got["stored"] = page.evaluate("() => sessionStorage.getItem('llmosd.token')") == token
        page.wait_for_selector("#model-rows tr", timeout=20000)
        got["models"] = page.eval_on_selector_all(
            "#model-rows tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )

        page.click('.tabs [data-tab="embed"]')
        page.fill("#embed-input", "a text typed on a phone")
        page.click("#embed button[type=submit]")
        page.wait_for_function("() => document.getElementById('embed-output').textContent.length > 0", timeout=30000)
        got["embed"] = page.text_content("#embed-output")

        page.click('.tabs [data-tab="chat"]')
        page.fill("#chat-input", "Write three sentences about the sea.")
        page.click("#chat-send")
        page.wait_for_selector(".msg[data-streaming=false]", timeout=120000)
        reply = page.locator(".msg").last
        got["chat"] = {
            "text": reply.locator("span").text_content(),
            "pieces": int(reply.get_attribute("data-pieces") or 0),
            "reads": int(reply.get_attribute("data-reads") or 0),
            "error": page.text_content("#play-error"),
        }

        # live data: the embed made requests, the chat generated tokens; a sample or two later they show
        page.wait_for_function(
            "() => ['chart-requests', 'chart-latency', 'chart-tokens', 'chart-batch']"
            ".map(id => document.getElementById(id).dataset)"
            ".every(d => +(d.peak || 0) > 0 && +(d.samples || 0) >= 5)",
            timeout=30000,
        )
        got["charts"] = charts(page)
        got["overflow_px"] = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        page.screenshot(path=out + "/console-phone.png", full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})
        time.sleep(1.5)
        page.screenshot(path=out + "/console-desktop.png", full_page=True)
        got["token_in_page"] = token in page.content()
        page.reload()  # the token was kept for this tab: no second prompt
        page.wait_for_selector("#model-rows tr", timeout=20000)
        got["asked_again"] = page.is_visible("#login")
        got["requests"], got["problems"] = seen, problems
        b.close()
    print(json.dumps(got))
    """
)

LOOPBACK_DRIVER = LAUNCH + textwrap.dedent(
    """
    url, chromium, out = sys.argv[1:4]
    got = {}
    with sync_playwright() as p:
        b = browser(p, chromium)
        context = b.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        seen, problems = watch(context, page)
        page.goto(url + "/")
        page.wait_for_selector("#model-rows tr", timeout=20000)
        got["login_hidden"] = page.is_hidden("#login")
        got["models"] = page.eval_on_selector_all("#model-rows tr", "rows => rows.map(r => r.cells[0].textContent)")
        page.wait_for_function("() => +document.getElementById('chart-memory').dataset.samples >= 3", timeout=20000)
        got["charts"] = charts(page)
        # the console's quantile arithmetic (Prometheus' histogram_quantile) on cumulative buckets
        q = "(q, b, before, after) => window.llmosdConsole.quantile(q, b, before, after)"
        cases = [
            [0.5, [1, 2, 4], None, [1, 3, 4, 4]],
            [0.99, [1, 2, 4], None, [1, 3, 4, 4]],
            [0.5, [1, 2, 4], [1, 1, 1, 1], [1, 3, 4, 4]],
            [0.5, [1, 2, 4], None, [0, 0, 0, 2]],
            [0.5, [1, 2, 4], [1, 1, 1, 1], [1, 1, 1, 1]],
        ]
        got["quantiles"] = [page.evaluate("([q, b, x, y]) => (" + q + ")(q, b, x, y)", c) for c in cases]
        # a pull the daemon cannot do (offline, and not in the hub's cache): its message, and the failed entry
        page.fill("#pull-ref", "hf.co/test-org/Not-Cached")
        page.click("#pull-start")
        page.wait_for_function("() => !document.getElementById('pull-start').disabled", timeout=30000)
        got["pull"] = page.text_content("#pull-state")
        listed = "() => document.getElementById('pulls').textContent.includes('Not-Cached')"
        page.wait_for_function(listed, timeout=20000)
        got["pulls"] = page.text_content("#pulls")
        page.screenshot(path=out + "/console-loopback.png", full_page=True)
        got["requests"], got["problems"] = seen, problems
        b.close()
    print(json.dumps(got))
    """
)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("chromium is not installed, and .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return found


def drive(script: str, *args: str, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a driver (Playwright and its chromium) at the lowest CPU priority: on two cores a starting
    browser would otherwise keep the daemon's event loop from running and its loop watch would call that
    a block (tests fail on one); the daemon, not the browser, is what is under test."""
    cmd = [*prefix, "nice", "-n", "19", sys.executable, "-c", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def only_from(origin: str, requests: list[str]) -> list[str]:
    """The requests the page made to anywhere but ``origin``."""
    return [u for u in requests if not u.startswith(origin + "/") and not u.startswith("data:")]


def test_the_console_from_the_lan_asks_a_token_charts_live_data_and_streams_a_chat(
    netns: str, store_dir: Path, tmp_path: Path
) -> None:
    browser = chromium()
    state = store_with(store_dir, tmp_path / "state", (DEFAULT, SMOLLM2))
    # greedy: the console sends no seed, and SmolLM2's own sampling once answered in two words
    r = llmosd("models", "set", SMOLLM2, "temperature=0", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    r = llmosd("tokens", "add", "phone", "--scope", "read,infer", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    env = {"LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_METRICS_SCRAPE_FROM": f"{NS_ADDR}/32"}
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, env=env)
    try:
        shown = llmosd("cert", "show", "--json", "--state-dir", str(state))
        assert shown.returncode == 0, shown.stderr
        spki = json.loads(shown.stdout)["key_pin"]
        url = f"https://{HOST_ADDR}:{d.port}"
        shots = tmp_path / "screenshots"
        shots.mkdir()
        cafile = str(exported(d, tmp_path))
        got = drive(LAN_DRIVER, url, spki, token, cafile, str(shots), browser, prefix=("ip", "netns", "exec", netns))
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]

    status, body = got["metrics"]
    assert status == 200 and "llmosd_model_request_duration_seconds" in body  # the scrape range, no token
    assert got["stats_without_token"] == 401 and got["page_without_token"] == 200  # the page holds no data
    assert got["main_hidden"] and "not valid" in got["wrong"]
    assert got["stored"] and not got["token_in_page"] and not got["asked_again"]
    models = {row[0]: row for row in got["models"]}
    assert set(models) == {DEFAULT, SMOLLM2}, got["models"]
    assert models[DEFAULT][3] == "int8" and models[DEFAULT][6].startswith("passed")  # the manifest's figures
    assert "384 dimensions" in got["embed"], got["embed"]
    chat = got["chat"]
    assert chat["error"] == "" and len(chat["text"].split()) >= 5, chat
    assert chat["pieces"] >= 5 and chat["reads"] >= 3, chat  # shown as it arrived, not as one body
    charts = got["charts"]
    assert all(c["canvas"] and c["samples"] >= 5 for c in charts.values()), charts
    assert charts["chart-memory"]["peak"] > 0, charts
    assert got["overflow_px"] <= 0, "the page is wider than a phone"
    assert only_from(url, got["requests"]) == [], got["requests"]
    # the browser's own lines for the 401s of the token step are expected; nothing else went wrong
    assert [p for p in got["problems"] if "401" not in p] == [], got["problems"]
    assert (shots / "console-phone.png").stat().st_size > 10_000
    print(f"screenshots: {shots}")


def test_the_console_on_loopback_needs_no_token(daemon: Daemon, tmp_path: Path) -> None:
    browser = chromium()
    url = f"http://127.0.0.1:{daemon.port}"
    got = drive(LOOPBACK_DRIVER, url, browser, str(tmp_path))
    assert got["login_hidden"] and DEFAULT in got["models"], got
    assert got["charts"]["chart-memory"]["peak"] > 0, got["charts"]
    *finite, empty = got["quantiles"]
    assert finite == pytest.approx([1.5, 3.92, 1.75, 4]) and empty is None, got["quantiles"]
    assert "hf.co/test-org/Not-Cached is not in the hub's cache" in got["pull"], got["pull"]
    assert "Not-Cached · failed" in got["pulls"], got["pulls"]
    assert only_from(url, got["requests"]) == [], got["requests"]
    # the browser logs the refused pull's 404 itself; nothing else went wrong
    assert [p for p in got["problems"] if "404" not in p] == [], got["problems"]
