"""Artifacts travel between CPUs: one exported and validated on a box whose ONNX Runtime kernels differ
from this one's (another ISA: AVX2 against AVX-512, x86 against arm64) is re-checked here before it
serves. The exporter records in the manifest the CPU its gate ran on and the gate's reference data;
here the task's adapter runs the gate's short form on this box's kernels (a causal LM: PyTorch's next
token at the decisive positions of the validation text, teacher-forced through the served decoder, and
whether a row decodes alone as beside others). The result is kept beside the artifact in the store
(``checks/``), so it runs once per artifact and CPU; a version that fails it is refused, saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Protocol, runtime_checkable

from llmosd.hardware.model import CpuInfo
from llmosd.runtime import LoadedModel
from llmosd.store import Manifest, ModelStore

log = logging.getLogger(__name__)


class NotPortable(Exception):
    """The artifact failed the gate's short form on this box's CPU kernels."""


@runtime_checkable
class Rechecks(Protocol):
    """A backend that can run its task's gate short form (the text-generation adapter does)."""

    rechecked: dict[str, Any] | None

    def recheck(self, reference: dict[str, Any]) -> dict[str, Any]: ...


def this_cpu(cpu: CpuInfo) -> dict[str, Any]:
    return {"arch": cpu.arch, "kernels": list(cpu.kernels)}


def validated_elsewhere(manifest: Manifest, cpu: CpuInfo) -> bool:
    """Whether the manifest's gate ran on other CPU kernels than this box's and left data to re-check
    against (an export that recorded neither is served as before)."""
    made, reference = manifest.validation.get("cpu"), manifest.validation.get("recheck")
    if not isinstance(made, dict) or not isinstance(reference, dict):
        return False
    here = this_cpu(cpu)
    return {k: made.get(k) for k in here} != here


def check_portable(loaded: LoadedModel, cpu: CpuInfo, store: ModelStore) -> dict[str, Any] | None:
    """Run (or read) the gate's short form where the artifact was validated on other kernels; None where
    there is nothing to check (the same kernels, an export that recorded no CPU or no reference data, a
    task with no short form). Raises NotPortable when it fails. Blocking: run it in a thread."""
    validation = loaded.manifest.validation
    made, reference = validation.get("cpu"), validation.get("recheck")
    here = this_cpu(cpu)
    backend = loaded.backend
    if not validated_elsewhere(loaded.manifest, cpu) or not isinstance(backend, Rechecks):
        return None
    assert isinstance(made, dict) and isinstance(reference, dict)  # validated_elsewhere saw to it
    digest = loaded.manifest.model_digest
    key = "cpu" + hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()[:16]
    result = store.checks.get(digest, key)
    if result is None:
        tolerances = validation.get("tolerance")
        tolerance = tolerances.get("top1_agreement") if isinstance(tolerances, dict) else None
        figures = backend.recheck(reference)
        passed = not isinstance(tolerance, int | float) or figures["top1_agreement"] >= tolerance
        result = {"exported_on": made, "here": here, "figures": figures, "tolerance": tolerance, "passed": passed}
        store.checks.put(digest, key, result)
        log.info(
            "%s was validated on other CPU kernels (%s); on these (%s) its top-1 agreement is %.3f: %s",
            loaded.manifest.ref,
            _kernels(made),
            _kernels(here),
            figures["top1_agreement"],
            "passed" if passed else "refused",
        )
    backend.rechecked = result
    if not result.get("passed"):
        agreement = float(result.get("figures", {}).get("top1_agreement", 0.0))
        raise NotPortable(
            f"{loaded.manifest.ref} was validated on {_kernels(made)}; on this CPU ({_kernels(here)}) its "
            f"top-1 agreement with the reference is {agreement:.3f}, below the gate's {result.get('tolerance')}"
        )
    return result


def _kernels(cpu: dict[str, Any]) -> str:
    kernels = cpu.get("kernels")
    return f"{cpu.get('arch')} {'/'.join(kernels) if isinstance(kernels, list) else '?'}"
