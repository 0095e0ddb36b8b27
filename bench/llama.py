"""llama.cpp's ``llama-server``, built once from the llama-cpp-python sdist's vendored source and cached
outside the repository (cmake + ninja, ~7 min on 2 cores). The benches and the routing tests share it:

    python bench/llama.py [--jobs N]   # builds it if needed, then prints the binary's path

llama.cpp is a peer in benches and tests only, never a dependency of llmosd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LLAMA_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmosd-bench" / "llama.cpp"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_FLAGS = (
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    # Native, but without AMX: a VM may list amx_tile in /proc/cpuinfo while its kernel refuses the tile
    # state, and the native build then dies of SIGILL on the very machine that built it (seen on a Xeon
    # guest). GCC honours an explicit -mno-* over -march=native whatever the order.
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
)


def llama_source() -> Path:
    return next(LLAMA_CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))


def build_llama_server(jobs: int = 0) -> Path:
    """The cached binary, or a fresh build of it. A stamp file marks a finished build (the binaries find
    their shared libraries by the build folder's absolute path, so the folder cannot be renamed into
    place): a killed build is built again, and so is one made on a CPU with other instructions."""
    build = LLAMA_CACHE / "build"
    binary, done = build / "bin" / "llama-server", build / ".llmosd-built"
    # llama.cpp builds for the native CPU: a cache built on another one (a VM moved to another host)
    # dies of SIGILL, so the stamp holds the CPU's and the build's flags, and either changing builds again
    if binary.is_file() and done.is_file() and done.read_text() == build_stamp():
        return binary
    LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
    if not any(LLAMA_CACHE.glob("llama_cpp_python-*/vendor/llama.cpp")):
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
        subprocess.run([*pip, "-d", str(LLAMA_CACHE)], check=True)
        sdist = sorted(LLAMA_CACHE.glob("llama_cpp_python-*.tar.gz"))[-1]
        shutil.unpack_archive(sdist, LLAMA_CACHE)
    configure = ["cmake", "-S", str(llama_source()), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run([*configure, *LLAMA_FLAGS], check=True, stdout=subprocess.DEVNULL)
    parallel = ["-j", str(jobs)] if jobs else []  # ninja's default: every core and two more
    subprocess.run(["ninja", "-C", str(build), *parallel, "llama-server"], check=True, stdout=subprocess.DEVNULL)
    done.write_text(build_stamp())
    return binary


def build_stamp() -> str:
    return " ".join(LLAMA_FLAGS) + "\n" + cpu_flags()


def cpu_flags() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return " ".join(sorted(line.partition(":")[2].split())) + "\n"
    return "\n"


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="build llama-server (cached) and print its path")
    p.add_argument("--jobs", type=int, default=0, help="parallel compile jobs (default: ninja's)")
    print(build_llama_server(p.parse_args().jobs))
