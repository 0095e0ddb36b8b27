"""The installed tasks: every ``llmosd.tasks`` entry point of every installed distribution, llmosd's own first.

A package that fails to import, registers something that is not a ``Task``, registers it under another
name, or claims a task or a route already taken is left out and named in ``problems`` (logged, and in
``GET /api/tasks``): one broken plugin must not keep the daemon from serving the rest.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmosd.runtime.adapters import Adapter
from llmosd.tasks.contract import Task

log = logging.getLogger(__name__)
GROUP = "llmosd.tasks"
_OWN = "llmosd"


@dataclass(frozen=True)
class Registered:
    task: Task
    package: str  # the distribution that registered it
    version: str


@dataclass(frozen=True)
class Tasks(Mapping[str, Task]):
    """The registered tasks by name, in registration order."""

    entries: tuple[Registered, ...] = ()
    problems: tuple[str, ...] = ()
    _by_name: dict[str, Registered] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.task.name: e for e in self.entries})

    def __getitem__(self, name: str) -> Task:
        return self._by_name[name].task

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def adapters(self) -> dict[str, Adapter]:
        return {e.task.name: e.task.adapter for e in self.entries}

    def paths(self) -> dict[str, Mapping[str, Any]]:
        """The tasks' routes as OpenAPI path items."""
        return {path: item for e in self.entries for path, item in e.task.paths.items()}

    def exportable(self) -> list[str]:
        return [e.task.name for e in self.entries if e.task.export is not None]

    def report(self) -> dict[str, Any]:
        """What ``GET /api/tasks`` answers: each task, who registered it, what it serves and exports."""
        tasks = []
        for e in self.entries:
            t = e.task
            routes = sorted({f"{r.method} {r.path}" for r in t.routes if isinstance(r, web.RouteDef)})
            precisions = list(t.export.tolerances) if t.export is not None else []
            tasks.append(
                {"name": t.name, "summary": t.summary, "package": e.package, "version": e.version}
                | {"routes": routes, "export_precisions": precisions}
            )
        return {"tasks": tasks, "problems": list(self.problems)}


def _route_keys(task: Task) -> set[tuple[str, str]]:
    return {(r.method, r.path) for r in task.routes if isinstance(r, web.RouteDef)}


def collect(found: Iterable[tuple[str, str, str, Any]]) -> Tasks:
    """Tasks from (entry-point name, package, version, loaded object), first claim wins."""
    entries: list[Registered] = []
    problems: list[str] = []
    taken: dict[tuple[str, str], str] = {}
    for name, package, version, obj in found:
        where = f"{package}'s entry point {name!r}"
        if not isinstance(obj, Task):
            problems.append(f"{where} is a {type(obj).__name__}, not an llmosd.tasks.Task")
        elif obj.name != name:
            problems.append(f"{where} registers the task {obj.name!r} under another name")
        elif any(e.task.name == name for e in entries):
            owner = next(e.package for e in entries if e.task.name == name)
            problems.append(f"{where}: the task {name!r} is registered already, by {owner}")
        elif clash := sorted(k for k in _route_keys(obj) if k in taken):
            method, path = clash[0]
            problems.append(f"{where}: {method} {path} is served already, by the task {taken[clash[0]]!r}")
        else:
            entries.append(Registered(obj, package, version))
            taken |= dict.fromkeys(_route_keys(obj), name)
    for problem in problems:
        log.warning("task left out: %s", problem)
    return Tasks(tuple(entries), tuple(problems))


def discover() -> Tasks:
    """Every installed distribution's ``llmosd.tasks`` entry points, llmosd's own first. Blocking (imports)."""
    points = sorted(
        importlib.metadata.entry_points(group=GROUP),
        key=lambda ep: (ep.dist is None or ep.dist.name != _OWN, ep.dist.name if ep.dist else "", ep.name),
    )
    loaded: list[tuple[str, str, str, Any]] = []
    broken: list[str] = []
    for ep in points:
        package, version = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("(unknown)", "")
        try:
            loaded.append((ep.name, package, version, ep.load()))
        except Exception as exc:  # a plugin's own bug: reported, never the daemon's end
            broken.append(f"{package}'s entry point {ep.name!r} failed to load: {type(exc).__name__}: {exc}")
            log.warning("task left out: %s", broken[-1])
    tasks = collect(loaded)
    if not any(e.package == _OWN for e in tasks.entries):
        # llmosd's own tasks come from its installed metadata: a source tree nobody installed has none
        broken.append("llmosd's built-in tasks are not registered: install llmosd (pip install -e .)")
        log.error("%s", broken[-1])
    return Tasks(tasks.entries, (*broken, *tasks.problems))
