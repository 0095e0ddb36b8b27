"""Which ONNX Runtime execution provider a model really runs on.

onnxruntime-gpu lists the CUDA provider even where its libraries or a GPU are missing, then falls back
to CPU while printing errors to stderr. Whether CUDA loads is the hardware probe's finding
(``llmosd.hardware.providers``), handed to the selector: it asks for CUDA only where the probe created a
session on it, with ORT's logging silenced, looks at what the session actually got, and logs a fallback
once per selector instead of once per session.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A one-node ONNX model (y = Relu(x), opset 13), 65 bytes: enough to learn whether a provider loads
# without touching the real model (a failed CUDA attempt on a real model costs ~70 MB of peak RSS).
PROBE_MODEL = base64.b64decode(
    "CAg6NwoMCgF4EgF5IgRSZWx1EgVwcm9iZVoPCgF4EgoKCAgBEgQKAggBYg8KAXkSCgoICAESBAoCCAFCBAoAEA0="
)
_QUIET = 4  # ORT's FATAL: nothing below it reaches stderr while we probe
_ORT_DEFAULT = 2  # WARNING, ORT's own default
# What the probe found of the CUDA provider: not installed, a session created on it, listed but no session.
CudaState = Literal["absent", "loads", "fails"]


@dataclass(frozen=True)
class Placement:
    """Where one session ended up, and why."""

    device: str  # "cpu" or "cuda:<n>"
    providers: tuple[str, ...]
    note: str = ""
    threads: int = 0  # the CPU intra-op pool (0 on a GPU)


def default_threads() -> int:
    """Physical cores: ORT's intra-op pool gains nothing from hyper-threads on GEMM-bound work."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # psutil cannot read the topology in some containers
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _beside(model: Path, external: Mapping[str, Path]) -> Iterator[Path]:
    """The graph under a temporary name with its external-data files beside it under the names it uses
    (symbolic links: the store names files by digest). ORT then maps the weights from the file itself and
    drops what it packed: a 1.17B int4 graph keeps 1,011 MB resident (peak 1,145) where handing ORT the
    same bytes from memory keeps 1,452 (peak 2,388). ORT admits only data that resolves into the
    graph's own directory, as the store's blobs do. The links go once the session exists."""
    real = model.resolve().parent
    if any(path.resolve().parent != real for path in external.values()):
        raise ValueError(f"external data must lie beside {model.name} (in {real})")
    with tempfile.TemporaryDirectory(prefix="llmosd-graph-") as tmp:
        graph = Path(tmp) / "model.onnx"
        graph.symlink_to(model.resolve())
        for name, path in external.items():
            if Path(name).name != name or name == graph.name:
                raise ValueError(f"unusable external-data name {name!r}")
            (Path(tmp) / name).symlink_to(path.resolve())
        yield graph


def session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Spinning pool threads answer the next parallel section in microseconds instead of a futex wake-up,
    # but burn the cores the event loop needs meanwhile: a knob, measured in bench/.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """Silence ORT while a provider is tried: the CUDA bridge logs its failures to the default logger."""
    ort.set_default_logger_severity(_QUIET)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT)


class ProviderSelector:
    """Creates sessions on the best provider the probe found loading; CUDA only where it did."""

    def __init__(
        self, device: str = "auto", threads: int | None = None, spinning: bool = True, cuda: CudaState = "absent"
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if cuda not in ("absent", "loads", "fails"):
            raise ValueError(f"cuda must be absent, loads or fails, not {cuda!r}")
        self.device = device
        self.threads = threads or default_threads()
        self.spinning = spinning
        self.cuda = cuda
        self._warned = False
        self._lock = threading.Lock()

    def create(
        self,
        model: Path | bytes,
        devices: tuple[str, ...] = ("cpu", "cuda"),
        target: str | None = None,
        threads: int | None = None,
        external: Mapping[str, Path] | None = None,
    ) -> tuple[Any, Placement]:
        """Return ``(InferenceSession, Placement)`` for an ONNX file meant for ``devices``.

        ``target`` is where placement wants it ("cpu" or "cuda:<n>"; None: the best that loads);
        ``threads`` overrides the intra-op pool size (instances sharing the CPU split its cores);
        ``external`` maps the external-data file names the graph uses to where those files are (the
        store names its files by digest, so ORT could not find them beside the graph)."""
        if external:
            if not isinstance(model, Path):
                raise ValueError("a graph with external data is loaded from its file")
            with _beside(model, external) as graph:
                return self.create(graph, devices, target, threads)
        src = str(model) if isinstance(model, Path) else model
        threads = threads or self.threads
        gpu = 0 if target is None or target == "cpu" else int(target.partition(":")[2] or 0)
        with self._lock:
            wants_cuda = self.device != "cpu" and "cuda" in devices and target != "cpu"
            if wants_cuda and self.cuda == "loads":
                providers: list[Any] = [(CUDA, {"device_id": gpu}), CPU]
                try:
                    with quiet_ort():  # a failure here is logged below, not printed by ORT's bridge
                        opts = session_options(threads, self.spinning)
                        session = ort.InferenceSession(src, opts, providers=providers)
                except Exception as exc:  # a broken CUDA install may raise instead of falling back
                    why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    log.warning("CUDA loaded for the probe but not for this model (%s); it runs on CPU", why)
                else:
                    if CUDA in session.get_providers():
                        return session, Placement(f"cuda:{gpu}", tuple(session.get_providers()))
                    log.warning("CUDA loaded for the probe but not for this model; it runs on CPU")
            elif wants_cuda and self.cuda == "fails" and not self._warned:
                self._warned = True
                log.warning("CUDA execution provider is listed but does not load; serving on CPU")
            if self.device == "cuda":
                raise RuntimeError("device = cuda, but the CUDA execution provider does not load here")
            if "cpu" not in devices:
                raise RuntimeError(f"this artifact runs only on {', '.join(devices)}, and no such device loads")
            session = ort.InferenceSession(src, session_options(threads, self.spinning), providers=[CPU])
            broken = self.device != "cpu" and self.cuda == "fails"
            note = "cuda listed but does not load" if broken else ""
            if target is not None and target != "cpu":
                note = f"placed on {target}, but the CUDA provider does not load: running on cpu"
            return session, Placement("cpu", (CPU,), note, threads)
