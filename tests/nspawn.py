"""A real systemd, booted in a container: ``systemd-nspawn -D / --volatile=yes --private-network -b``
gives this machine's /usr over an empty, throw-away root (a factory-fresh box with no network but its
own loopback). Commands run inside through ``nsenter`` into the container's namespaces. Needs root
and systemd-nspawn (Debian's systemd-container; CI installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# units of this machine that a fresh container would start and that have no business there (the
# first-boot wizard would wait for a keyboard)
MASK = ("avahi-daemon.service", "avahi-daemon.socket", "docker-registry.service", "systemd-firstboot.service")


def require_nspawn() -> str:
    tool = shutil.which("systemd-nspawn")
    if tool is not None and os.geteuid() == 0:
        return tool
    why = "systemd-nspawn is missing (apt-get install systemd-container)" if tool is None else "it needs root"
    if os.environ.get("LLMOSD_TEST_STRICT"):
        pytest.fail(f"{why}; CI installs it and runs as root")
    pytest.skip(why)


@dataclass
class Container:
    leader: int  # the container's PID 1 (systemd), as the host sees it
    log: Path

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        """Run a command inside; its stdout (stderr folded in on failure)."""
        prefix = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--"]
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        full = [*prefix, "env", *extra, *cmd] if extra else [*prefix, *cmd]
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, prop: str, value: str, timeout: float = 90) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.show(unit, prop, "ActiveState", "SubState", "StatusText", "NRestarts")
            if got.get(prop) == value:
                return got
            if time.monotonic() > deadline:
                journal = self.run("journalctl", "--no-pager", "-n", "60", "-u", unit, check=False)
                raise AssertionError(f"{unit}: {prop} is {got.get(prop)!r}, not {value!r}; {got}\n{journal}")
            time.sleep(0.3)


@contextmanager
def booted(workdir: Path, binds: Sequence[tuple[str, str]] = (), volatile: str = "yes") -> Iterator[Container]:
    """Boot a container, wait until its systemd has finished starting up, and power it off at the end.
    ``binds`` are (host path, container path) pairs, mounted read-only. ``volatile="overlay"`` keeps this
    machine's whole tree under a throw-away writable layer (to install a package into) instead of an
    empty root over its /usr."""
    tool = require_nspawn()
    log = workdir / "nspawn.log"
    name = f"llmosd-test-{os.getpid()}"
    masks = []
    for unit in MASK:
        masks += [f"--bind-ro=/dev/null:/etc/systemd/system/{unit}"]  # a unit that is /dev/null is masked
    cmd = [
        tool,
        "-D",
        "/",
        f"--volatile={volatile}",
        "--private-network",
        "--keep-unit",
        "--register=no",
        f"--machine={name}",
        *masks,
        *(f"--bind-ro={src}:{dst}" for src, dst in binds),
        "-b",
    ]
    mounted: list[Path] = []
    if volatile == "overlay":  # nspawn offers no overlay over "/" itself: we make one and boot that
        layer = workdir / "overlay"
        layer.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(layer)], check=True)
        mounted.append(layer)
        for d in ("upper", "work", "root"):
            (layer / d).mkdir()
        options = f"lowerdir=/,upperdir={layer / 'upper'},workdir={layer / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layer / "root")], check=True)
        mounted.insert(0, layer / "root")
        cmd[cmd.index("/")] = str(layer / "root")
        cmd[cmd.index("--volatile=overlay")] = "--volatile=no"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        leader = _leader(proc, log)
        box = Container(leader, log)
        deadline = time.monotonic() + 90
        while True:  # "degraded" is fine: some unit of this machine's /usr may not suit a container
            state = box.run("systemctl", "is-system-running", check=False).strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the container did not boot ({state}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield box
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _leader(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The container's PID 1: nspawn's child that runs systemd."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            pid, comm = line.split(None, 1)
            if comm.strip() == "systemd":
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no systemd inside the container:\n{log.read_text()[-3000:]}")


def python_binds() -> tuple[list[tuple[str, str]], str, str]:
    """Binds that make this checkout and its dependencies usable inside, at neutral paths under /opt
    (the service's private /tmp would hide a checkout under /tmp), and the interpreter to run them with:
    the system's Python of the same minor version where there is one (as the .deb uses), else this
    interpreter's prefix, bound at its own path (its shared library is found there). Returns the binds,
    the interpreter and the PYTHONPATH."""
    import sysconfig

    src = str(Path(__file__).resolve().parents[1])
    site = sysconfig.get_paths()["purelib"]
    binds = [(src, "/opt/llmosd-src"), (site, "/opt/llmosd-site")]
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / minor
    if system.is_file():
        return binds, str(system), "/opt/llmosd-src:/opt/llmosd-site"
    binds.append((sys.base_prefix, sys.base_prefix))
    return binds, str(Path(sys.base_prefix) / "bin" / minor), "/opt/llmosd-src:/opt/llmosd-site"
