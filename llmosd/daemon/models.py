"""The seed stage: the default models into an empty store (imported or exported), every active model
loaded, then readiness declared. In a task of its own: the listeners answer /healthz meanwhile."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from llmosd.api import AppState
from llmosd.daemon.chain import Stage, cancel
from llmosd.export import ExportError, export_model
from llmosd.readiness import Phase
from llmosd.seed import DEFAULT_MODELS
from llmosd.store import ManifestError, StoreError

log = logging.getLogger("llmosd")


async def _import_seed(st: AppState, problems: list[str]) -> None:
    """The default models from ``seed_archive`` (a package's own, installed by root: no signature asked)."""
    path = Path(st.config.seed_archive)
    if not st.config.seed_archive or all(st.store.versions(d.name) for d in DEFAULT_MODELS):
        return
    if not path.is_file():
        log.warning("seed archive %s is not there; exporting the default models instead", path)
        return
    from llmosd.registry.airgap import import_archive

    st.readiness.move(Phase.IMPORTING, f"first start: importing the default models from {path}")
    log.info("%s", st.status_line)
    try:
        for r in await import_archive(st.store, path, trust=None):
            log.info("seeded %s from %s", r.manifest.ref, path)
    except Exception as exc:
        problems.append(f"failed to import {path}: {exc}")
        log.error("%s", problems[-1])


async def _seed(st: AppState, problems: list[str]) -> None:
    """Import or export each default model missing from the store; one that fails does not stop the others."""
    await _import_seed(st, problems)
    for default in DEFAULT_MODELS:
        if st.store.versions(default.name):
            continue
        src = default.source_path()
        try:
            if src is None:
                raise ExportError(
                    f"default model {default.name} needs the {default.package} package: {default.install}"
                )
            task = st.tasks.get(default.task)
            if task is None:
                raise ExportError(
                    f"default model {default.name} is a {default.task} model: no installed task serves it"
                )
            line = f"first start: exporting {default.name} ({st.config.default_precision})"
            st.readiness.move(Phase.EXPORTING, line)
            log.info("%s; later starts reuse the store", line)
            await export_model(
                st.store,
                src,
                task=task,
                precision=st.config.default_precision,
                name=default.name,
                source_id=default.source_id,
                sampling=dict(default.sampling),
            )
        except Exception as exc:  # the daemon keeps answering health/status with the reason
            problems.append(f"failed to seed {default.name}: {exc}")
            log.error("%s", problems[-1], exc_info=not isinstance(exc, ExportError))


async def prepare_models(st: AppState) -> None:
    """Seed the defaults into an empty store, load every active model, then declare readiness.

    A model that fails to load (a corrupt blob, a CUDA-only artifact on a CPU box) is reported and
    skipped: the others still serve, and readiness waits only on the default models (without seeding:
    on every model active at start).
    """
    problems: list[str] = []
    if st.config.seed_defaults:
        await _seed(st, problems)
    names = [n for n in st.store.names() if st.store.active_version(n)]
    # Without seeded defaults, every model active at start is one the box is expected to serve.
    expected = st.default_models or tuple(names)
    for name in names:
        st.readiness.move(Phase.LOADING, f"loading {name}")
        st.pool.pinned.add(name)  # the box's own models stay; keep_alive is for those loaded on demand later
        try:
            await st.pool.load(name)
        except Exception as exc:
            problems.append(f"{name}: {exc}")
            log.error("cannot load %s: %s", name, exc, exc_info=not isinstance(exc, StoreError | ManifestError))
    loaded = {s.name for s in st.pool.served()}
    missing = [n for n in expected if n not in loaded]
    if missing:
        problems.insert(0, f"default model(s) not loaded: {', '.join(missing)}")
    devices = sorted({d for s in st.pool.served() for d in s.devices}) or ["-"]
    line = "; ".join([f"serving {len(loaded)} model(s) on {', '.join(devices)}", *problems])
    st.readiness.move(Phase.DEGRADED if missing else Phase.SERVING, line)
    log.log(logging.INFO if st.ready else logging.ERROR, "%s: %s", "ready" if st.ready else "not ready", line)


class SeedStage(Stage):
    name = "seed"

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(prepare_models(self.state))

    async def stop(self) -> None:
        """A first-start export still running is abandoned (its temporary files are swept next start)."""
        await cancel(self._task)
