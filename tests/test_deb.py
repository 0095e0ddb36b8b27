"""The .deb: `make deb`'s script builds it, lintian finds no error in it, and in a container with a real
systemd (this machine's tree under a throw-away overlay) `apt install ./llmosd_*.deb` creates the user,
starts the socket and the service with the default models seeded from the package, a member of the
llmosd group uses the Unix socket, and `dpkg -r` / `dpkg -P` leave no unit, process, socket or state
behind (the system user stays, as Debian's practice is)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.nspawn import booted

REPO = Path(__file__).resolve().parents[1]

CLIENT = textwrap.dedent(
    """
    import http.client, json, socket, sys
    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect("/run/llmosd/llmosd.sock")
    conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "all-minilm-l6-v2", "input": "hi"}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    print(r.status, len(json.loads(r.read())["data"][0]["embedding"]))
    """
)


@pytest.fixture(scope="module")
def deb(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/usr/bin/python3").is_file() or shutil.which("dpkg-deb") is None:
        pytest.fail("building the .deb needs Debian's python3 (with venv) and dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    seed = out / "models.tar"  # the default models from the test store: no export needed here
    r = subprocess.run(
        [sys.executable, str(REPO / "packaging/seed_archive.py"), str(seed), "--store", str(store_dir)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, DEB_OUT=str(out), SEED_ARCHIVE=str(seed))
    r = subprocess.run([str(REPO / "packaging/build-deb.sh")], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = out.glob("llmosd_*_*.deb")
    return path


def test_lintian_finds_no_error(deb: Path) -> None:
    lintian = shutil.which("lintian")
    if lintian is None:
        if os.environ.get("LLMOSD_TEST_STRICT"):
            pytest.fail("lintian is missing; .ci/run installs it")
        pytest.skip("lintian is not installed (apt-get install lintian)")
    r = subprocess.run([lintian, "--fail-on", "error", str(deb)], capture_output=True, text=True, timeout=600)
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert r.returncode == 0 and not errors, "\n".join(errors) or r.stderr


def test_install_use_remove_and_purge(deb: Path, tmp_path: Path) -> None:
    (tmp_path / "client.py").write_text(CLIENT)
    binds = [(str(deb.parent), "/mnt/llmosd-deb"), (str(tmp_path / "client.py"), "/mnt/llmosd-client.py")]
    with booted(tmp_path, binds, volatile="overlay") as box:
        # An image built by Docker carries a policy-rc.d that forbids starting services on install (exit
        # 101: this machine's has one since 2025-05); a real box has none. It goes from the throw-away
        # layer only, so the package's own maintainer scripts start the service as on a real install.
        box.run("rm", "-f", "/usr/sbin/policy-rc.d")
        out = box.run("apt-get", "install", "-y", f"/mnt/llmosd-deb/{deb.name}", timeout=600)
        assert "Setting up llmosd" in out, out
        assert box.run("getent", "passwd", "llmosd").startswith("llmosd:")
        state = box.wait_for("llmosd.service", "ActiveState", "active", timeout=180)
        assert state["StatusText"] == "serving 2 model(s) on cpu", state
        assert box.show("llmosd.socket", "ActiveState", "UnitFileState") == {
            "ActiveState": "active",
            "UnitFileState": "enabled",
        }
        log = box.run("journalctl", "--no-pager", "-o", "cat", "-u", "llmosd.service")
        assert "first start: importing the default models from /usr/share/llmosd/models.tar" in log

        # a person in the llmosd group uses the Unix socket; one outside it cannot
        box.sh("useradd -m alice && useradd -m mallory && usermod -aG llmosd alice")
        as_user = "setpriv --reuid {u} --regid {u} --init-groups /usr/bin/python3 /mnt/llmosd-client.py"
        assert box.sh(as_user.format(u="alice")).split() == ["200", "384"]
        denied = box.sh(as_user.format(u="mallory") + " 2>&1; echo $?", check=False)
        assert "Permission denied" in denied and denied.strip().endswith("1"), denied

        box.run("dpkg", "-r", "llmosd", timeout=300)
        assert box.run("pgrep", "-u", "llmosd", check=False).strip() == ""  # no process left
        assert box.show("llmosd.service", "ActiveState")["ActiveState"] == "inactive"
        assert box.show("llmosd.socket", "ActiveState")["ActiveState"] == "inactive"
        left = box.sh(
            "ls -d /run/llmosd/llmosd.sock /usr/lib/systemd/system/llmosd.* /opt/llmosd /usr/bin/llmosd 2>/dev/null"
            " | wc -l"
        )
        assert left.strip() == "0", box.sh("ls -la /run/llmosd /opt/llmosd 2>&1", check=False)
        assert box.sh("ls /var/lib/llmosd/models && test -f /etc/llmosd/config.toml && echo kept").split()[-1] == "kept"

        box.run("dpkg", "-P", "llmosd", timeout=300)
        gone = box.sh(
            "ls -d /var/lib/llmosd /etc/llmosd /etc/systemd/system/*/llmosd.* /etc/systemd/system/llmosd.*"
            " 2>/dev/null | wc -l"
        )
        assert gone.strip() == "0", box.sh("find /etc/systemd/system -name 'llmosd*'", check=False)
        assert "llmosd" not in box.run("dpkg-query", "-W", "-f", "${Package} ${Status}\n", check=False).split()


def test_the_arm64_venv_holds_aarch64_wheels_only(tmp_path: Path) -> None:
    """`make deb ARCH=arm64` fills its venv with the wheels PyPI has for aarch64: every shared object is an
    AArch64 ELF, ONNX Runtime is the CPU package (onnxruntime-gpu has no aarch64 wheel), and the console
    script runs the venv's interpreter where the package installs it. (Run on an emulated arm64 Debian:
    README, "Debian package".)"""
    venv = tmp_path / "opt" / "llmosd"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    minor = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    r = subprocess.run(
        [sys.executable, str(REPO / "packaging/cross_venv.py"), str(venv), "arm64", minor],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    site = venv / "lib" / f"python{minor}" / "site-packages"
    machines = set()
    for so in site.rglob("*.so*"):
        header = so.read_bytes()[:20]
        if header[:4] == b"\x7fELF":
            machines.add(int.from_bytes(header[18:20], "little"))
    assert machines == {183}  # EM_AARCH64 only
    assert (site / "onnxruntime").is_dir() and not list(site.glob("onnxruntime_gpu*"))
    assert (site / "llmosd" / "cli.py").is_file()
    assert (venv / "bin" / "llmosd").read_text().startswith("#!/opt/llmosd/bin/python3\n")
