"""Two network namespaces joined by a veth pair: a LAN of two boxes that never touches the host's own
interfaces (multicast, a registry on a non-loopback address). Needs root (CI runs as root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

A_ADDR, B_ADDR, A_EXTRA = "10.204.72.1", "10.204.72.2", "10.204.72.11"
HOST_ADDR, NS_ADDR = "10.203.71.1", "10.203.71.2"  # one_client(): this host's end, the client's


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Lan:
    a: str  # namespace names
    b: str

    def run(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("network namespaces need root, and CI runs as root")
        pytest.skip("network namespaces need root (CI runs as root)")


@contextmanager
def one_client() -> Iterator[str]:
    """A namespace joined to this host by a veth pair: a LAN client (at NS_ADDR) of a daemon listening on
    HOST_ADDR here, which sees it as a non-local address."""
    ns, host_if, ns_if = f"llmosd-t{os.getpid()}", f"lh{os.getpid() % 100000}", f"ln{os.getpid() % 100000}"
    _need_root()
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


@contextmanager
def two_boxes() -> Iterator[Lan]:
    _need_root()
    tag = os.getpid() % 100000
    lan = Lan(f"llmosd-a{tag}", f"llmosd-b{tag}")
    try:
        sh("ip", "netns", "add", lan.a)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"`ip netns add` is refused here: {exc}")
    try:
        sh("ip", "netns", "add", lan.b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for ns, dev, addr in ((lan.a, f"va{tag}", A_ADDR), (lan.b, f"vb{tag}", B_ADDR)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh(*lan.run(ns), "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh(*lan.run(ns), "ip", "link", "set", dev, "up")
            sh(*lan.run(ns), "ip", "link", "set", "lo", "up")
        yield lan
    finally:
        subprocess.run(["ip", "netns", "del", lan.a], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "netns", "del", lan.b], capture_output=True)
