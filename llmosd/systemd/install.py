"""``llmosd install-service [--user]``: the units shipped in ``llmosd/systemd/units`` (the .deb installs
the same files), with ExecStart pointing at the interpreter running this command, written where
systemd looks for local units, then enabled and started.

System units (root) run as the ``llmosd`` user created through sysusers.d, with the full hardening.
User units (``--user``, for a desktop or a box without root) drop what a user manager cannot do
(another user, device and system-call policy, capability sets) and put the socket in ``$XDG_RUNTIME_DIR``."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmosd.atomic import replace_file

UNITS = ("llmosd.service", "llmosd.socket")
SERVICE_USER = "llmosd"
# user managers have no privileges to drop and no other users to become
SYSTEM_ONLY = (
    "User=",
    "Group=",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "DevicePolicy=",
    "DeviceAllow=",
    "SystemCallFilter=",
    "SystemCallErrorNumber=",
    "SystemCallArchitectures=",
    "Protect",
    "Private",
    "Restrict",
    "RemoveIPC=",
    "KeyringMode=",
    "LockPersonality=",
    "NoNewPrivileges=",
    "SocketGroup=",
)


class InstallError(Exception):
    pass


def shipped(name: str) -> str:
    return (resources.files("llmosd.systemd") / "units" / name).read_text()


def exec_start(python: str = sys.executable) -> str:
    return f"{shlex.quote(python)} -m llmosd serve"


def render(name: str, *, user: bool, python: str = sys.executable, pythonpath: str | None = None) -> str:
    """A shipped unit as this install needs it."""
    lines = []
    for line in shipped(name).splitlines():
        if line.startswith("ExecStart="):
            lines.append(f"ExecStart={exec_start(python)}")
            if pythonpath:  # the import path this command runs with, so the service finds the same code
                lines.append(f"Environment={shlex.quote('PYTHONPATH=' + pythonpath)}")
            continue
        if user:
            if line.startswith(SYSTEM_ONLY) or line.startswith("# no device") or line.startswith("# hardening"):
                continue
            line = line.replace("/run/llmosd/llmosd.sock", "%t/llmosd/llmosd.sock")
            line = line.replace("SocketMode=0660", "SocketMode=0600")
            line = line.replace("WantedBy=multi-user.target", "WantedBy=default.target")
            line = line.replace("After=llmosd.socket network.target", "After=llmosd.socket")
        lines.append(line)
    return "\n".join(lines) + "\n"


def reachable_by_others(path: Path) -> str | None:
    """The first directory on the way to ``path`` that other users cannot enter (the service user is one
    of them), or None."""
    for parent in [*reversed(path.resolve().parents), path.resolve()]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            return str(parent)
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return str(parent)
    return None


@dataclass(frozen=True)
class Plan:
    unit_dir: Path
    files: dict[Path, str]  # path -> content
    commands: list[list[str]]


def plan(user: bool, root: Path = Path("/"), python: str = sys.executable) -> Plan:
    pythonpath = os.environ.get("PYTHONPATH") or None
    if user:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        unit_dir = root / str(config).lstrip("/") / "systemd" / "user"
    else:
        unit_dir = root / "etc/systemd/system"
    files = {unit_dir / n: render(n, user=user, python=python, pythonpath=pythonpath) for n in UNITS}
    ctl = ["systemctl", "--user"] if user else ["systemctl"]
    commands = [[*ctl, "daemon-reload"], [*ctl, "enable", "--now", *UNITS]]
    if not user:
        sysusers = root / "etc/sysusers.d/llmosd.conf"
        files[sysusers] = shipped("llmosd.sysusers")
        commands.insert(0, ["systemd-sysusers", str(sysusers)])
    return Plan(unit_dir, files, commands)


def install(user: bool, *, dry_run: bool = False) -> Plan:
    if not user and os.geteuid() != 0:
        raise InstallError("system units need root: sudo llmosd install-service (or --user for your own manager)")
    if not user and (blocked := reachable_by_others(Path(sys.executable))) is not None:
        raise InstallError(
            f"the service user {SERVICE_USER!r} cannot enter {blocked}, where this Python lives; install llmosd "
            "somewhere it can (python3 -m venv /opt/llmosd && /opt/llmosd/bin/pip install llmosd) or use --user"
        )
    p = plan(user)
    if dry_run:
        return p
    for path, content in p.files.items():
        replace_file(path, content)
    for cmd in p.commands:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"{' '.join(cmd)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return p
