"""The hardware probe on this machine (CPU only) and with a fake NVML at the probe boundary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmosd.hardware import Hardware, probe
from llmosd.hardware.cpu import parse_cpuinfo, probe_cpu
from llmosd.hardware.providers import probe_providers
from tests.conftest import DEFAULT, SMOLLM2, Daemon

GIB = 1 << 30


def test_the_probe_on_this_machine_is_clean_and_cpu_only() -> None:
    """Run as a person would (`llmosd hardware --json`): nothing on stderr, CPU listed, CUDA explained."""
    r = subprocess.run([sys.executable, "-m", "llmosd", "hardware", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    hw = json.loads(r.stdout)
    assert hw["cpu"]["logical_cores"] >= 1 and hw["cpu"]["memory_total"] > GIB
    assert "avx2" in hw["cpu"]["isa"] or "neon" in hw["cpu"]["isa"]
    assert "avx2" in hw["cpu"]["kernels"] or "neon" in hw["cpu"]["kernels"]
    assert hw["gpus"] == [] and hw["nvml"] != "ok"  # no NVIDIA driver here
    providers = {p["name"]: p for p in hw["providers"]}
    assert providers["CPUExecutionProvider"]["available"]
    if "CUDAExecutionProvider" in providers:  # onnxruntime-gpu lists it; it cannot load without a driver
        assert not providers["CUDAExecutionProvider"]["available"]
        assert "libcuda.so.1" in providers["CUDAExecutionProvider"]["reason"]
    r = subprocess.run([sys.executable, "-m", "llmosd", "hardware"], capture_output=True, text=True)
    assert r.returncode == 0 and "CPUExecutionProvider: available" in r.stdout and "GPU" in r.stdout
    assert "ONNX Runtime's CPU kernels: " in r.stdout


def test_arm_cpuinfo_reports_neon(tmp_path: Path) -> None:
    text = "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp\n"
    model, flags = parse_cpuinfo(text)
    assert "asimd" in flags and model == ""  # arm64 kernels often print no model name
    (tmp_path / "cpuinfo").write_text(text)
    cpu = probe_cpu(tmp_path / "cpuinfo")
    assert "neon" in cpu.isa and "asimddp" in cpu.isa and "avx2" not in cpu.isa
    assert probe_cpu(tmp_path / "missing").isa == ()  # unreadable: empty, not an exception


def test_kernel_levels_follow_mlas_platform_checks() -> None:
    """The levels ONNX Runtime's MLAS picks kernels by, read from /proc/cpuinfo's flags as its CPUID checks
    read them: AVX-512 needs all four core parts, VNNI needs them, AMX needs tile and int8."""
    from llmosd.hardware.model import kernel_levels

    zen2 = {"avx", "avx2", "fma", "f16c"}
    assert kernel_levels(zen2, "x86_64") == ("avx2",)
    assert kernel_levels(zen2 | {"avx512f", "avx512_vnni"}, "x86_64") == ("avx2",)  # no BW/DQ/VL: no AVX-512
    zen4 = zen2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
    assert kernel_levels(zen4, "x86_64") == ("avx2", "avx512", "avx512-vnni")
    spr = zen4 | {"avx_vnni", "amx_tile", "amx_int8"}
    assert kernel_levels(spr, "x86_64") == ("avx2", "avx-vnni", "avx512", "avx512-vnni", "amx")
    assert kernel_levels({"avx", "f16c"}, "x86_64") == ()  # MLAS's AVX/SSE baseline
    assert kernel_levels({"asimd", "asimddp", "i8mm"}, "aarch64") == ("neon", "dotprod", "i8mm")
    _, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    here = probe_cpu()
    assert here.kernels == kernel_levels(flags, here.arch)  # the probe reports what the flags say


@dataclass
class FakeGpu:
    name: str
    total: int
    free: int
    cc: tuple[int, int]
    pci: bool = True


class FakeNvml:
    """A stand-in for pynvml with the calls the probe makes: the one place hardware is faked."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[FakeGpu], init_error: str | None = None, fail_on: str | None = None) -> None:
        self.gpus, self.init_error, self.fail_on = gpus, init_error, fail_on
        self.shut = False

    def _maybe_fail(self, call: str) -> None:
        if call == self.fail_on:
            raise self.NVMLError(f"{call} failed")

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        self._maybe_fail("count")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        return h.name.encode()

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return f"GPU-{abs(hash(h.name)) % 10**8:08d}"

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return type("Memory", (), {"total": h.total, "free": h.free})()

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        return h.cc

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> object:
        if not h.pci:
            raise self.NVMLError("Not Supported")
        return object()


def fake_probe(nvml: FakeNvml) -> Hardware:
    return probe(nvml=nvml, providers=lambda: probe_providers(available=lambda: ["CPUExecutionProvider"]))


def test_a_two_gpu_box_a_small_gpu_and_an_integrated_one() -> None:
    two = FakeNvml(
        [FakeGpu("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0)), FakeGpu("Tesla T4", 16 * GIB, 15 * GIB, (7, 5))]
    )
    hw = fake_probe(two)
    assert [g.device_id for g in hw.gpus] == ["cuda:0", "cuda:1"] and two.shut
    assert hw.gpus[0].compute_capability == (9, 0) and not hw.gpus[0].integrated
    assert hw.driver_version == "550.54.15" and hw.cuda_driver_version == "12.4" and hw.nvml == "ok"
    small = fake_probe(FakeNvml([FakeGpu("NVIDIA GeForce GTX 1650", 4 * GIB, 3 * GIB, (7, 5))]))
    assert small.gpus[0].memory_total == 4 * GIB and small.gpus[0].memory_free == 3 * GIB
    orin = fake_probe(FakeNvml([FakeGpu("Orin (nvgpu)", 32 * GIB, 20 * GIB, (8, 7), pci=False)]))
    assert orin.gpus[0].integrated
    assert json.loads(json.dumps(hw.as_dict()))["gpus"][1]["device_id"] == "cuda:1"


@pytest.mark.parametrize(
    ("nvml", "why"),
    [
        (FakeNvml([], init_error="NVML Shared Library Not Found"), "NVML unavailable: NVML Shared Library Not Found"),
        (FakeNvml([], init_error="Driver Not Loaded"), "NVML unavailable: Driver Not Loaded"),
        (FakeNvml([]), "NVML found no GPU"),
        (FakeNvml([FakeGpu("x", GIB, GIB, (8, 0))], fail_on="count"), "NVML query failed: count failed"),
    ],
)
def test_no_driver_no_library_no_gpu_is_a_clean_cpu_only_result(nvml: FakeNvml, why: str) -> None:
    hw = fake_probe(nvml)
    assert hw.gpus == () and hw.nvml == why and hw.cpu.logical_cores >= 1
    assert [p.name for p in hw.providers] == ["CPUExecutionProvider"]


def test_a_provider_is_explained_without_asking_ort_when_its_driver_is_missing() -> None:
    asked: list[str] = []

    def creates(name: str) -> tuple[bool, str]:
        asked.append(name)
        return name == "CPUExecutionProvider", ""

    statuses = probe_providers(
        available=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        creates=creates,
        missing=lambda names: [n for n in names if n == "libcuda.so.1"],
    )
    assert asked == ["CPUExecutionProvider"]
    assert statuses[0].reason == "cannot open libcuda.so.1" and statuses[1].available
    # with a driver but without the CUDA runtime libraries: ORT is asked, and the reason names them
    statuses = probe_providers(
        available=lambda: ["CUDAExecutionProvider"],
        creates=lambda name: (False, ""),
        missing=lambda names: [n for n in names if n == "libcublasLt.so.12"],
    )
    assert statuses[0] == statuses[0].__class__("CUDAExecutionProvider", False, "cannot open libcublasLt.so.12")


async def test_api_hardware_shows_the_probe_and_where_models_run(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s, s.get(daemon.url + "/api/hardware") as r:
        hw = await r.json()
    assert r.status == 200 and hw["cpu"]["physical_cores"] >= 1
    placed = {p["model"]: p["device"] for p in hw["placements"]}
    assert placed[DEFAULT] == "cpu" and placed[SMOLLM2] == "cpu"


INJECTED = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    import aiohttp
    from llmosd.config import load_config
    from llmosd.daemon import serve
    from llmosd.hardware import CpuInfo, GpuInfo, Hardware, ProviderStatus

    def fake():
        cpu = CpuInfo("Fake CPU", "x86_64", 64, 128, ("avx2", "avx512f"), 512 << 30, 500 << 30)
        gpus = tuple(GpuInfo(i, "NVIDIA H100", f"GPU-{i}", 80 << 30, 79 << 30, (9, 0), False) for i in range(2))
        return Hardware(cpu, gpus, "550.54.15", "12.4", "ok", (ProviderStatus("CPUExecutionProvider", True),))

    async def main():
        cfg = load_config({"state_dir": sys.argv[1], "socket": sys.argv[2], "host": "none", "seed_defaults": False}, {})
        task = asyncio.create_task(serve(cfg, probe_hardware=fake))
        while True:
            await asyncio.sleep(0.1)
            try:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sys.argv[2])) as s:
                    async with s.get("http://x/api/hardware") as r:
                        if r.status == 200:
                            print(json.dumps(await r.json()))
                            break
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        await task

    asyncio.run(main())
""")


def test_the_daemon_serves_an_injected_probe(tmp_path: Path) -> None:
    """The probe is a constructor argument of the daemon (Ollama's lesson): a 2-GPU box, faked at the boundary."""
    r = subprocess.run(
        [sys.executable, "-c", INJECTED, str(tmp_path / "state"), str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    hw = json.loads(r.stdout.splitlines()[-1])
    assert [g["device_id"] for g in hw["gpus"]] == ["cuda:0", "cuda:1"] and hw["cpu"]["model"] == "Fake CPU"
    assert hw["placements"] == []
