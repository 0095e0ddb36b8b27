"""LAN discovery with real multicast: two network namespaces joined by a veth pair, a daemon advertising
in one, browsers (ours, the SDK, avahi) in the other. Nothing is sent on the host's own interfaces.
Needs root for `ip netns` (CI runs as root)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEFAULT, Daemon, start_daemon, unix_json
from tests.netns import A_ADDR, A_EXTRA, B_ADDR, Lan, sh

NAME = "llmosd-test-box"
FP32 = "minilm-fp32"


class Watch:
    """`llmosd discover --watch --json` in a namespace: its events, read as they come."""

    def __init__(self, prefix: tuple[str, ...]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "llmosd", "discover", "--watch", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def expect(self, match: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(event)
            if match(event):
                return event
        raise AssertionError(f"no matching event within {timeout} s; seen: {self.seen}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def store_copy(store_dir: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    shutil.copytree(store_dir, dst, symlinks=True, ignore=shutil.ignore_patterns("tls"))  # a box's own key
    (dst / "id").unlink(missing_ok=True)  # a copied install id would make two boxes one (as a cloned disk does)
    for model in (dst / "models").iterdir():
        if model.name not in keep:
            shutil.rmtree(model)
    return dst


def advertising_daemon(
    lan: Lan, ns: str, state: Path, workdir: Path, name: str = NAME, extra: dict[str, str] | None = None
) -> Daemon:
    env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false", "LLMOSD_MDNS_NAME": name, **(extra or {})}
    workdir.mkdir()
    return start_daemon(state, workdir, "--host", "0.0.0.0", env=env, prefix=lan.run(ns))


def wait_advertised(d: Daemon, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name := unix_json(d, "/api/status")["mdns"]:
            return str(name)
        time.sleep(0.2)
    raise AssertionError(f"not advertised within {timeout} s:\n{d.log.read_text()[-3000:]}")


def wait_peer(d: Daemon, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in unix_json(d, "/api/status")["peers"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} not among the peers within {timeout} s:\n{d.log.read_text()[-3000:]}")


SDK = textwrap.dedent(
    """
    import asyncio, json, sys
    from llmosd import AsyncClient, Client
    from llmosd.client import ApiError
    name, token, model, install_id = sys.argv[1:5]
    client = Client(name=name, token=token)
    out = {"where": client.where, "dims": len(client.load_model(model).embed("across the namespaces")[0])}
    try:
        Client(name=name, token="").models()
    except ApiError as exc:
        out["without_token"] = [exc.status, exc.type]
    async def by_id():
        async with AsyncClient(id=install_id, token=token) as c:
            m = await c.load_model(model)
            return c.target.where, len((await m.embed(["one", "two"]))[1]), (await c.status())["id"]
    out["async"] = asyncio.run(by_id())
    from llmosd.client import async_discover, discover
    out["discover"] = [a.name for a in discover(3)]
    out["async_discover"] = [a.id for a in asyncio.run(async_discover(3))]
    # a known_hosts line with another certificate and key for this box: refused, whatever mDNS says
    import os
    from llmosd.client.pinning import CertificateRefused
    with open(os.environ["LLMOSD_KNOWN_HOSTS"]) as f:
        out["known"] = f.read()
    with open(os.environ["LLMOSD_KNOWN_HOSTS"], "w") as f:
        f.write(f"id:{install_id} {'a' * 64} {'b' * 64}\\n")
    try:
        Client(name=name, token=token).models()
    except CertificateRefused as exc:
        out["impostor"] = str(exc)
    print(json.dumps(out))
    """
)


def test_an_appliance_is_found_across_namespaces_and_follows_its_models(
    lan: Lan, store_dir: Path, tmp_path: Path
) -> None:
    state = store_copy(store_dir, tmp_path / "a-state", (DEFAULT, FP32))
    parked = tmp_path / "parked"
    shutil.move(state / "models" / FP32, parked)  # arrives later, like a pulled model
    watch = Watch(lan.run(lan.b))
    a = advertising_daemon(lan, lan.a, state, tmp_path / "a")
    b: Daemon | None = None
    try:
        assert wait_advertised(a) == NAME
        install_id = unix_json(a, "/api/status")["id"]
        fp = unix_json(a, "/api/status")["tls"]["fingerprint"]  # tls = "auto": on for a LAN listener
        found = watch.expect(lambda e: e["event"] == "added" and e["name"] == NAME)
        assert (
            found["addresses"] == [A_ADDR] and found["port"] == a.port and found["url"] == f"https://{A_ADDR}:{a.port}"
        )
        assert (found["api"], found["id"], found["path"], found["devices"]) == ("1", install_id, "/v1", ["cpu"])
        assert found["models"] == [DEFAULT] and found["auth"] is True and found["tls"] is True
        assert found["fingerprint"] == fp
        assert a.token not in json.dumps(found)  # never a secret in TXT

        r = subprocess.run(
            [*lan.run(lan.b), sys.executable, "-m", "llmosd", "discover", "--json", "--timeout", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        listed = {x["name"]: x for x in json.loads(r.stdout)}
        assert listed[NAME]["id"] == install_id and listed[NAME]["models"] == [DEFAULT]

        # a model loaded, then unloaded (keep_alive 0): the TXT records follow
        shutil.move(parked, state / "models" / FP32)
        unix_json(a, "/v1/embeddings", {"model": FP32, "input": "load it"})
        watch.expect(lambda e: e["event"] == "updated" and e["models"] == [DEFAULT, FP32])
        unix_json(a, "/v1/embeddings", {"model": FP32, "input": "and let it go", "keep_alive": 0})
        watch.expect(lambda e: e["event"] == "updated" and e["models"] == [DEFAULT])

        # an address added to the interface is picked up (polled) and announced
        sh(*lan.run(lan.a), "ip", "addr", "add", f"{A_EXTRA}/24", "dev", f"va{os.getpid() % 100000}")
        watch.expect(lambda e: e["event"] == "updated" and sorted(e["addresses"]) == [A_ADDR, A_EXTRA])
        assert "mDNS: addresses changed from 10.204.72.1 to 10.204.72.1,10.204.72.11" in a.log.read_text()
        sh(*lan.run(lan.a), "ip", "addr", "del", f"{A_EXTRA}/24", "dev", f"va{os.getpid() % 100000}")
        watch.expect(lambda e: e["event"] == "updated" and e["addresses"] == [A_ADDR])  # flushed on the LAN too

        # the SDK finds it by name (sync) and by id (async) and serves with the token
        known = tmp_path / "known_hosts"
        r = subprocess.run(
            [*lan.run(lan.b), sys.executable, "-c", SDK, NAME, a.token, DEFAULT, install_id],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(
                os.environ,
                LLMOSD_SOCKET=str(tmp_path / "absent.sock"),
                LLMOSD_URL="",
                LLMOSD_TOKEN="",
                LLMOSD_KNOWN_HOSTS=str(known),
            ),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        sdk = json.loads(r.stdout)
        assert sdk["where"] in (f"https://{A_ADDR}:{a.port}", f"https://{A_EXTRA}:{a.port}") and sdk["dims"] == 384
        # pinned by the fp= record, and recorded on first use under the box's install id
        assert sdk["known"].split()[:2] == [f"id:{install_id}", fp]
        assert sdk["without_token"] == [401, "authentication_error"]
        assert sdk["async"][1:] == [384, install_id] and sdk["async"][0].endswith(f":{a.port}")
        assert sdk["discover"] == [NAME] and sdk["async_discover"] == [install_id]
        assert f"with a key other than the one recorded at first use ({'a' * 64}" in sdk["impostor"]

        # a second appliance with the same name, on the other host: renamed, and both are seen
        b = advertising_daemon(lan, lan.b, store_copy(store_dir, tmp_path / "b-state", (DEFAULT,)), tmp_path / "b")
        assert wait_advertised(b) == f"{NAME} (2)"
        second = watch.expect(lambda e: e["event"] == "added" and e["name"] == f"{NAME} (2)")
        assert second["addresses"] == [B_ADDR] and second["id"] != install_id
        assert f"the name '{NAME}' is taken on the LAN; advertising as '{NAME} (2)'" in b.log.read_text()

        # a clean stop says goodbye: the browser drops it at once, not when the records' TTL (120 s) runs out
        stopped = time.monotonic()
        assert a.stop() == 0
        watch.expect(lambda e: e["event"] == "removed" and e["name"] == NAME, timeout=10)
        assert time.monotonic() - stopped < 10
        assert "mDNS: sent goodbye" in a.log.read_text()
    finally:
        watch.stop()
        for d in (a, b):
            if d is not None and d.proc.poll() is None:
                d.stop()


def test_a_loopback_listener_is_not_advertised_and_says_why(store_dir: Path, tmp_path: Path) -> None:
    state = store_copy(store_dir, tmp_path / "state", (DEFAULT,))
    d = start_daemon(state, tmp_path, env={"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_AUTOTUNE": "false"})
    try:
        with urllib.request.urlopen(d.url + "/api/status") as r:
            assert json.load(r)["mdns"] is None
    finally:
        assert d.stop() == 0
    assert "mDNS: not advertising: the TCP listener is on 127.0.0.1" in d.log.read_text()


BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={iface}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
disable-user-service-publishing=yes
"""


def test_avahi_sees_the_advertisement(lan: Lan, store_dir: Path, tmp_path: Path) -> None:
    """An independent mDNS implementation (avahi, with its own dbus-daemon) in the browsing namespace."""
    missing = [t for t in ("avahi-daemon", "avahi-browse", "dbus-daemon") if shutil.which(t) is None]
    if missing:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail(f"{', '.join(missing)} missing; .ci/run installs avahi-daemon and avahi-utils")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install avahi-daemon avahi-utils)")
    iface = f"vb{os.getpid() % 100000}"
    (tmp_path / "bus.conf").write_text(BUS_CONF.format(sock=tmp_path / "bus.sock"))
    (tmp_path / "avahi.conf").write_text(AVAHI_CONF.format(iface=iface))
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path / 'bus.sock'}")
    bus = subprocess.Popen([*lan.run(lan.b), "dbus-daemon", "--nofork", f"--config-file={tmp_path / 'bus.conf'}"])
    avahi = None
    a = advertising_daemon(lan, lan.a, store_copy(store_dir, tmp_path / "state", (DEFAULT,)), tmp_path / "a")
    try:
        for _ in range(50):
            if (tmp_path / "bus.sock").exists():
                break
            time.sleep(0.1)
        avahi_cmd = ["avahi-daemon", "-f", str(tmp_path / "avahi.conf"), "--no-drop-root", "--no-chroot"]
        avahi = subprocess.Popen(
            [*lan.run(lan.b), *avahi_cmd, "--no-rlimits", "--no-proc-title"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_advertised(a)
        install_id = unix_json(a, "/api/status")["id"]
        line = ""
        for _ in range(20):  # avahi-daemon takes a moment to come up and hear the announcement
            r = subprocess.run(
                [*lan.run(lan.b), "avahi-browse", "-rpt", "_llmosd._tcp"],
                capture_output=True,
                text=True,
                timeout=30,
                env=env,
            )
            line = next((x for x in r.stdout.splitlines() if x.startswith("=;")), "")
            if line:
                break
            time.sleep(0.5)
        assert line, f"avahi-browse saw nothing: {r.stdout} {r.stderr}"
        fields = line.split(";")
        assert fields[2] == "IPv4" and fields[3] == NAME and fields[4] == "_llmosd._tcp"
        assert fields[7] == A_ADDR and fields[8] == str(a.port)
        txt = dict(x.strip('"').split("=", 1) for x in fields[9].split('" "'))
        assert txt["id"] == install_id and txt["models"] == DEFAULT and txt["auth"] == "1" and txt["api"] == "1"
        assert txt["tls"] == "1" and txt["fp"] == unix_json(a, "/api/status")["tls"]["fingerprint"]
    finally:
        a.stop()
        for p in (avahi, bus):
            if p is not None:
                p.terminate()
                p.wait(10)


def test_a_second_appliance_pulls_every_blob_from_the_first(lan: Lan, store_dir: Path, tmp_path: Path) -> None:
    """The LAN peer cache: a registry in namespace A; appliance A pulls from it, appliance B (namespace B)
    finds A by mDNS and takes every file from A: the registry's log shows no blob request from B."""
    from tests.registry import docker_registry

    with docker_registry(tmp_path / "registry", prefix=lan.run(lan.a), addr=A_ADDR) as reg:
        ref = f"{reg.host}/models/minilm:stable"
        push = [
            *lan.run(lan.a),
            sys.executable,
            "-m",
            "llmosd",
            "models",
            "push",
            DEFAULT,
            ref,
            "--insecure",
            "--state-dir",
        ]
        r = subprocess.run([*push, str(store_dir)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        site = {"LLMOSD_INSECURE_REGISTRIES": reg.host, "LLMOSD_ALLOW_UNSIGNED_FROM": reg.host}
        daemons = []
        for ns, name in ((lan.a, "site-a"), (lan.b, "site-b")):
            state = tmp_path / f"{name}-state"
            state.mkdir()
            (state / "token").write_text("one-token-for-the-whole-site\n")  # a site shares its token
            (state / "token").chmod(0o600)
            daemons.append(advertising_daemon(lan, ns, state, tmp_path / name, name, site))
        a, b = daemons
        try:
            for d in daemons:
                wait_advertised(d)
            wait_peer(b, "site-a")  # each daemon keeps browsing: B knows A before it pulls
            wait_peer(a, "site-b")
            assert unix_json(a, "/api/status")["peers"] == ["site-b"]  # never itself
            first = unix_json(a, "/api/models/pull", {"ref": ref})
            assert first["from_peers_bytes"] == 0 and first["fetched_bytes"] > 0  # B had nothing to give
            second = unix_json(b, "/api/models/pull", {"ref": ref})
            assert second["from_peers_bytes"] == second["fetched_bytes"] == first["fetched_bytes"]
            assert second["serving"] is False and second["name"] == DEFAULT
        finally:
            for d in daemons:
                d.stop()
        access = reg.log.read_text().splitlines()
        from_b = [line for line in access if line.startswith(B_ADDR + " ")]
        assert any("/manifests/stable" in line for line in from_b)  # B asked the registry what to pull...
        assert not [line for line in from_b if "/blobs/" in line]  # ...and took no file from it
        assert [line for line in access if line.startswith(A_ADDR + " ") and "/blobs/sha256:" in line]
        assert "came from LAN peers" in b.log.read_text()
