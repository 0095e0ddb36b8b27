"""Access control with a real non-local client: a network namespace joined by a veth pair.

Loopback and the Unix socket need no token (tested everywhere else); here a client in its own
namespace, at an address we assign, must present the bearer token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEFAULT, start_daemon

HOST_ADDR, NS_ADDR = "10.203.71.1", "10.203.71.2"

CLIENT = textwrap.dedent(
    """
    import json, sys, urllib.request, urllib.error
    url, token, model = sys.argv[1], sys.argv[2], sys.argv[3]
    def call(path, token=None, body=None):
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    body = json.dumps({"model": model, "input": "from the other namespace"}).encode()
    print(json.dumps({
        "none": call("/v1/embeddings", None, body),
        "wrong": call("/v1/embeddings", "wrong-token-value-123456", body),
        "right": call("/v1/embeddings", token, body)[0],
        "health": call("/healthz")[0],
        "models_without": call("/v1/models")[0],
        "forged": call("/v1/models/x%0A2026-12-01%2000:00:00,000%20INFO%20llmosd:%20forged%00%1B[2J")[0],
    }))
"""
)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    ns, host_if, ns_if = f"llmosd-t{os.getpid()}", f"lh{os.getpid() % 100000}", f"ln{os.getpid() % 100000}"
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    try:
        sh("ip", "netns", "add", ns)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"'ip netns add' refused here: {exc}")
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NS_ADDR}/24", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_non_local_clients_need_the_token(netns: str, store_dir: Path, tmp_path: Path) -> None:
    # mDNS off: this test is about the token; advertising is tested between two namespaces of its own
    d = start_daemon(store_dir, tmp_path, "--host", HOST_ADDR, env={"LLMOSD_MDNS": "false"})
    try:
        r = subprocess.run(
            [
                *("ip", "netns", "exec", netns),
                sys.executable,
                "-c",
                CLIENT,
                f"http://{HOST_ADDR}:{d.port}",
                d.token,
                DEFAULT,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        import json

        got = json.loads(r.stdout)
    finally:
        assert d.stop() == 0
    assert got["none"][0] == 401 and got["none"][1]["error"]["type"] == "authentication_error"
    assert got["wrong"][0] == 401
    assert got["right"] == 200
    assert got["health"] == 200  # probes reveal nothing and need no token
    assert got["models_without"] == 401
    assert got["forged"] == 401
    log = d.log.read_text()
    assert "refused POST /v1/embeddings from 10.203.71.2: wrong bearer token" in log
    # The unauthenticated path with a newline, a NUL and an escape sequence is logged escaped on one line.
    assert not any(line.startswith("2026-12-01 00:00:00,000 INFO llmosd: forged") for line in log.splitlines())
    assert "\x00" not in log and "\x1b" not in log
    assert "refused GET /v1/models/x\\x0a2026-12-01 00:00:00,000 INFO llmosd: forged\\x00\\x1b[2J from" in log
    assert "wrong-token-value" not in log and d.token not in log
