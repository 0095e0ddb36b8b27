"""Fill a virtual environment made on this box with llmosd and its dependencies for another architecture
(``make deb ARCH=arm64`` on an x86_64 box): the wheels that exist for that machine, from PyPI, never run
here.

    python packaging/cross_venv.py VENV ARCH PYTHON_MINOR

pip evaluates environment markers for the box it runs on, even with ``--platform``: llmosd's own
dependencies are therefore chosen here for the target machine (on arm64: ``onnxruntime``, since
``onnxruntime-gpu`` has no aarch64 wheel), then installed with ``--platform`` and ``--only-binary``,
so a dependency without a wheel for that machine fails the build rather than compiling for this one.
Markers of dependencies' own dependencies are still pip's, read for this box; none of today's depend on
the machine. The console script is written here, as pip writes it for ``--target`` installs elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

MACHINES = {"arm64": "aarch64", "amd64": "x86_64"}  # Debian's names to the kernel's
ROOT = Path(__file__).resolve().parent.parent
INSTALLED = "/opt/llmosd"  # where the package puts the venv (build-deb.sh)


def requirements(machine: str) -> list[str]:
    """llmosd's dependencies whose markers hold on Linux on ``machine``, markers dropped."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {**default_environment(), "platform_machine": machine, "sys_platform": "linux"}
    out = []
    for dep in deps:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def main(venv: Path, arch: str, minor: str) -> None:
    machine = MACHINES[arch]
    site = venv / "lib" / f"python{minor}" / "site-packages"
    platforms = [f"manylinux_2_{v}_{machine}" for v in (36, 34, 31, 28, 27, 26, 17)] + [f"manylinux2014_{machine}"]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--upgrade", "--target", str(site)]
    target = ["--only-binary=:all:", "--python-version", minor, "--implementation", "cp"]
    target += [arg for p in platforms for arg in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)], check=True)
        wheel = next(Path(tmp).glob("llmosd-*.whl"))
        subprocess.run([*pip, *target, *requirements(machine)], check=True)
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    for stray in ("bin",):  # --target puts the wheel's scripts beside the packages; the venv's bin/ has them
        extra = site / stray
        if extra.is_dir():
            for f in extra.iterdir():
                f.unlink()
            extra.rmdir()
    script = venv / "bin" / "llmosd"
    script.write_text(f"#!{INSTALLED}/bin/python3\nimport sys\n\nfrom llmosd.cli import main\n\nsys.exit(main())\n")
    script.chmod(0o755)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
