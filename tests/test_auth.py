"""Access control with a real non-local client: a network namespace joined by a veth pair.

Loopback and the Unix socket need no token (tested everywhere else); here a client in its own
namespace, at an address we assign, must present the bearer token.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.conftest import DEFAULT, exported, llmosd, start_daemon
from tests.netns import HOST_ADDR, NS_ADDR

CLIENT = textwrap.dedent(
    """
    import json, ssl, sys, urllib.request, urllib.error
    url, token, model = sys.argv[1], sys.argv[2], sys.argv[3]
    tls = ssl.create_default_context(cafile=sys.argv[4])  # the exported certificate, as curl --cacert
    def call(path, token=None, body=None):
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=10, context=tls) as r:
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


def test_non_local_clients_need_the_token(netns: str, store_dir: Path, tmp_path: Path) -> None:
    # mDNS off: this test is about the token; advertising is tested between two namespaces of its own
    from tests.conftest import store_with

    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    env = {"LLMOSD_MDNS": "false", "LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"}  # nor an export
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, env=env)
    try:
        r = subprocess.run(
            [
                *("ip", "netns", "exec", netns),
                sys.executable,
                "-c",
                CLIENT,
                f"https://{HOST_ADDR}:{d.port}",
                d.token,
                DEFAULT,
                str(exported(d, tmp_path)),
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


SCOPES_CLIENT = textwrap.dedent(
    """
    import json, ssl, sys, urllib.request, urllib.error
    url, model, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tls = ssl.create_default_context(cafile=sys.argv[4])
    def call(method, path, body, token):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=30, context=tls) as r:
                return [r.status, ""]
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())["error"]  # KServe's /v2 errors are a string
            return [e.code, err["message"] if isinstance(err, dict) else err]
    routes = {
        "embed": ("POST", "/v1/embeddings", {"model": model, "input": "hello"}),
        "models": ("GET", "/v1/models", None),
        "status": ("GET", "/api/status", None),
        "metrics": ("GET", "/metrics", None),
        "pull": ("POST", "/api/models/pull", {}),
        "sampling": ("POST", "/api/models/" + model + "/sampling", {"sampling": {"temperature": 0.5}}),
        "oip": ("GET", "/v2/models/" + model, None),
    }
    print(json.dumps({who: {r: call(*spec, token) for r, spec in routes.items()} for who, token in tokens.items()}))
"""
)


def test_scoped_tokens_each_reach_their_routes_and_revocation_applies_on_reload(
    netns: str, store_dir: Path, tmp_path: Path
) -> None:
    import json
    import signal
    import time

    from tests.conftest import store_with

    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    made = {}
    for name, scope in (("app", "infer"), ("grafana", "read"), ("ops", "admin")):
        r = llmosd("tokens", "add", name, "--scope", scope, "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        made[name] = r.stdout.strip()
    stored = (state / "tokens.json").read_text()
    assert all(t not in stored for t in made.values())  # hashed at rest
    assert (state / "tokens.json").stat().st_mode & 0o077 == 0
    bad = llmosd("tokens", "add", "x", "--scope", "root", "--state-dir", str(state))
    assert bad.returncode != 0 and "infer, read, admin" in bad.stderr

    env = {"LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false"}  # nor an export
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, env=env)

    def client(tokens: dict[str, str]) -> dict[str, dict[str, list[Any]]]:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", SCOPES_CLIENT]
        r = subprocess.run(
            [*cmd, f"https://{HOST_ADDR}:{d.port}", DEFAULT, json.dumps(tokens), str(exported(d, tmp_path))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        out: dict[str, dict[str, list[Any]]] = json.loads(r.stdout)
        return out

    try:
        got = client({**made, "legacy": d.token})
        codes = {who: {route: v[0] for route, v in routes.items()} for who, routes in got.items()}
        assert codes["app"] == {
            "embed": 200,
            "models": 200,
            "oip": 200,
            "status": 403,
            "metrics": 403,
            "pull": 403,
            "sampling": 403,
        }
        assert "lacks the 'read' scope that GET /api/status needs" in got["app"]["status"][1]
        assert "lacks the 'admin' scope that POST /api/models/pull needs" in got["app"]["pull"][1]
        assert codes["grafana"] == {
            "embed": 403,
            "models": 200,
            "oip": 200,
            "status": 200,
            "metrics": 200,
            "pull": 403,
            "sampling": 403,
        }
        assert "(grafana) lacks the 'infer' scope that POST /v1/embeddings needs" in got["grafana"]["embed"][1]
        for admin in ("ops", "legacy"):  # the token file's token keeps working as an admin token
            assert codes[admin]["embed"] == 200 and codes[admin]["status"] == 200 and codes[admin]["metrics"] == 200
            # past the scope check: the routes refuse an empty pull and an encoder's sampling themselves
            assert codes[admin]["pull"] == 400 and codes[admin]["sampling"] == 400

        revoked = llmosd("tokens", "revoke", "app", "--state-dir", str(state))
        assert revoked.returncode == 0, revoked.stderr
        listed = llmosd("tokens", "list", "--json", "--state-dir", str(state))
        assert [t["name"] for t in json.loads(listed.stdout)] == ["grafana", "ops"]
        seen = d.log.read_text().count("tokens: ")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while d.log.read_text().count("tokens: ") == seen and time.monotonic() < deadline:
            time.sleep(0.1)
        after = client({"app": made["app"], "ops": made["ops"]})
        assert after["app"]["embed"][0] == 401 and after["ops"]["embed"][0] == 200
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert "token app lacks the 'read' scope" in log and all(t not in log for t in made.values())


RATE_CLIENT = textwrap.dedent(
    """
    import json, ssl, sys, time, urllib.request, urllib.error
    url, token, model, lm = sys.argv[1:5]
    tls = ssl.create_default_context(cafile=sys.argv[5])
    def call(path, body):
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={
            "Content-Type": "application/json", "Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, timeout=60, context=tls) as r:
                return [r.status, None, ""]
        except urllib.error.HTTPError as e:
            return [e.code, e.headers.get("Retry-After"), json.loads(e.read())["error"]["message"]]
    embed = {"model": model, "input": "hello"}
    out = {"burst": [call("/v1/embeddings", embed) for _ in range(5)]}
    time.sleep(1.2)
    chat = {"model": lm, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 6, "ignore_eos": True}
    out["chat"] = call("/v1/chat/completions", chat)
    out["after_chat"] = call("/v1/embeddings", embed)
    time.sleep(2.2)  # the request bucket refills (the generated tokens' stays in debt a while)
    token = "wrong-token-guessed-0"
    out["guessing"] = [call("/v1/embeddings", embed) for _ in range(5)]
    print(json.dumps(out))
"""
)


def test_rate_limits_answer_429_with_retry_after_per_client(netns: str, store_dir: Path, tmp_path: Path) -> None:
    import http.client
    import json
    import socket

    from tests.conftest import SMOLLM2, store_with, unix_json

    state = store_with(store_dir, tmp_path / "state", (DEFAULT, SMOLLM2))
    env = {
        "LLMOSD_MDNS": "false",
        "LLMOSD_AUTOTUNE": "false",
        "LLMOSD_SEED_DEFAULTS": "false",
        "LLMOSD_RATE_LIMIT_RPS": "2",  # buckets of 2 s: 4 requests at once
        "LLMOSD_RATE_LIMIT_TOKENS_PER_S": "1",  # and 2 generated tokens
        "LLMOSD_RATE_LIMIT_BURST_S": "2",
    }
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, env=env)
    try:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", RATE_CLIENT]
        r = subprocess.run(
            [*cmd, f"https://{HOST_ADDR}:{d.port}", d.token, DEFAULT, SMOLLM2, str(exported(d, tmp_path))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        for _ in range(10):  # local clients are the box's own: never limited
            unix_json(d, "/v1/embeddings", {"model": DEFAULT, "input": "local"})
        conn = http.client.HTTPConnection("localhost", timeout=30)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(d.socket))
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
    finally:
        assert d.stop() == 0
    assert [c[0] for c in got["burst"]] == [200, 200, 200, 200, 429], got
    assert got["burst"][4][1] == "1" and "rate limited" in got["burst"][4][2]
    assert got["chat"][0] == 200, got
    # six tokens generated against a bucket of two: the next request waits out the debt (about 4 s)
    status, retry, _ = got["after_chat"]
    assert status == 429 and 3 <= int(retry) <= 5, got
    # A wrong token draws on the address's requests too: four refusals, then a 429 (and no more log lines).
    assert [c[0] for c in got["guessing"]] == [401, 401, 401, 401, 429], got
    assert "llmosd_rate_limited_requests_total 3.0" in metrics
    assert d.log.read_text().count("wrong bearer token") == 4


TLS_CLIENT = textwrap.dedent(
    """
    import hashlib, http.client, json, ssl, subprocess, sys
    import openai
    from llmosd.client import Client, ConnectionFailed
    from llmosd.client.pinning import CertificateRefused, unverified
    url, token, model, fp, cafile = sys.argv[1:6]
    host, port = url.removeprefix("https://").split(":")
    def seen(sock):
        return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
    def presented():
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=unverified())
        conn.connect()
        try:
            return seen(conn.sock)
        finally:
            conn.close()
    out = {}
    client = Client(url, token=token, fingerprint=fp)
    out["sdk"] = len(client.load_model(model).embed("pinned")[0])
    try:
        Client(url, token=token, fingerprint="0" * 64).models()
    except CertificateRefused as exc:
        out["wrong"] = str(exc)
    try:
        Client(url, token=token).models()
    except ConnectionFailed as exc:
        out["unpinned"] = str(exc)
    pinned_http = openai.DefaultHttpxClient(verify=client.ssl_context())
    pinned = openai.OpenAI(base_url=url + "/v1", api_key=token, http_client=pinned_http)
    out["openai_pinned"] = len(pinned.embeddings.create(model=model, input="x").data[0].embedding)
    cacert = ssl.create_default_context(cafile=cafile)  # host names checked too: the address is a SAN
    recipe = openai.OpenAI(base_url=url + "/v1", api_key=token, http_client=openai.DefaultHttpxClient(verify=cacert))
    out["openai_cacert"] = [m.id for m in recipe.models.list().data]
    auth = ["-H", "Authorization: Bearer " + token]
    fetch = ["curl", "-sS", "--cacert", cafile, *auth, url + "/v1/models"]
    curl = subprocess.run(fetch, capture_output=True, text=True)
    out["curl"] = [m["id"] for m in json.loads(curl.stdout)["data"]]
    plain = "http://" + url.removeprefix("https://") + "/v1/models"
    curl = subprocess.run(["curl", "-sS", "-w", "%{http_code}", *auth, plain], capture_output=True, text=True)
    out["plain"] = curl.stdout
    kept = http.client.HTTPSConnection(host, int(port), timeout=10, context=unverified())
    kept.request("GET", "/healthz")
    kept.getresponse().read()
    sock = kept.sock
    out["kept"] = seen(sock)
    print(json.dumps(out), flush=True)
    for _ in sys.stdin:  # after each reload: the kept connection still answers, a new one sees the new cert
        kept.request("GET", "/healthz")
        r = kept.getresponse()
        r.read()
        print(json.dumps({"kept": [r.status, kept.sock is sock, seen(kept.sock)], "new": presented()}), flush=True)
"""
)


def site_certificate(cert: Path, key: Path, address: str) -> str:
    """A site's own pair (here self-made, as a site CA's would arrive); its fingerprint."""
    import datetime as dt
    import ssl

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from llmosd.tls.certs import fingerprint, make_certificate

    private = ec.generate_private_key(ec.SECP256R1())
    pem = make_certificate(private, ["site-box.example"], [address], dt.datetime.now(dt.UTC))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert.write_bytes(pem)
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem.decode()))


def test_tls_is_on_for_the_lan_pinned_by_clients_and_renewed_on_reload(
    netns: str, store_dir: Path, tmp_path: Path
) -> None:
    """tls = "auto" on a LAN address: the SDK pinned by fingerprint, the openai SDK pinned and by the
    exported certificate, curl --cacert, a wrong pin refused, plain HTTP answered with a clear 400; then a
    reload to the site's own files, a renewal of those files in place and a broken file, each while a
    connection opened before stays open."""
    import json
    import signal
    import time

    from tests.conftest import store_with, unix_json

    state = store_with(store_dir, tmp_path / "state", (DEFAULT,))
    config = tmp_path / "llmosd.toml"
    config.write_text("")
    env = {"LLMOSD_MDNS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_DEFAULTS": "false"}
    d = start_daemon(state, tmp_path, "--host", HOST_ADDR, "--config", str(config), env=env)
    client: subprocess.Popen[str] | None = None

    def reload_until(text: str) -> None:
        seen = d.log.read_text().count(text)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while d.log.read_text().count(text) == seen:
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.1)

    def check() -> dict[str, Any]:
        assert client is not None and client.stdin is not None and client.stdout is not None
        client.stdin.write("check\n")
        client.stdin.flush()
        answer: dict[str, Any] = json.loads(client.stdout.readline())
        return answer

    try:
        shown = llmosd("cert", "show", "--json", "--state-dir", str(state))
        assert shown.returncode == 0, shown.stderr
        auto = json.loads(shown.stdout)
        fp = auto["fingerprint"]
        assert auto["self_signed"] and HOST_ADDR in auto["addresses"] and "localhost" in auto["dns_names"]
        assert unix_json(d, "/api/status")["tls"]["fingerprint"] == fp
        assert (state / "tls" / "key.pem").stat().st_mode & 0o077 == 0
        url = f"https://{HOST_ADDR}:{d.port}"
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", TLS_CLIENT]
        client = subprocess.Popen(
            [*cmd, url, d.token, DEFAULT, fp, str(exported(d, tmp_path))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line, client.communicate(timeout=10)[1][-3000:]
        got = json.loads(line)
        assert got["sdk"] == 384 and got["openai_pinned"] == 384
        assert got["openai_cacert"] == [DEFAULT] and got["curl"] == [DEFAULT]
        assert got["wrong"] == f"{url} presented the certificate {fp}, not the pinned {'0' * 64}; nothing was sent"
        assert "its certificate is not trusted (self-signed certificate); pin it with fingerprint=" in got["unpinned"]
        plain = json.loads(got["plain"][:-3])
        assert got["plain"].endswith("400") and plain["error"]["type"] == "tls_required"
        assert plain["error"]["message"] == f"this port speaks HTTPS only: use {url}/ (plain HTTP is refused)"
        assert got["kept"] == fp

        site_cert, site_key = tmp_path / "site.pem", tmp_path / "site.key"
        site_fp = site_certificate(site_cert, site_key, HOST_ADDR)
        config.write_text(f'tls_cert_file = "{site_cert}"\ntls_key_file = "{site_key}"\n')
        reload_until(f"now presenting the certificate {site_fp}")
        assert check() == {"kept": [200, True, fp], "new": site_fp}
        assert unix_json(d, "/api/status")["tls"]["source"] == str(site_cert)

        renewed_fp = site_certificate(site_cert, site_key, HOST_ADDR)  # renewed in place, as certbot does
        reload_until(f"now presenting the certificate {renewed_fp}")
        assert check() == {"kept": [200, True, fp], "new": renewed_fp}

        site_cert.write_text("not a certificate\n")  # a broken renewal changes nothing
        reload_until("the certificate in use stays")
        assert check() == {"kept": [200, True, fp], "new": renewed_fp}
    finally:
        if client is not None:
            client.kill()
            client.wait(10)
        assert d.stop() == 0
    log = d.log.read_text()
    assert f"{site_cert} holds no PEM certificate; the certificate in use stays" in log
    assert f"refused plain HTTP from {NS_ADDR} on the TLS port" in log and d.token not in log
