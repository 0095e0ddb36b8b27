"""The daemon's life as a chain of stages: each starts in order, owns its tasks, reload hook and status,
and stops in reverse order. A stage that fails to stop does not stop the others: teardown collects the
errors and goes on (what aiohttp's ``cleanup_ctx`` does for an application, for the whole daemon, whose
stages outlive the HTTP application: the listeners are one stage among the others)."""

from __future__ import annotations

import asyncio
import logging

from llmosd.reload import Reload

log = logging.getLogger("llmosd")


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a stage's task and wait until it has finished (its own cleanup included)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Stage:
    """One part of the daemon's life. Hooks default to doing nothing."""

    name = "stage"

    async def start(self) -> None:
        """Set up; long work goes into tasks of the stage's own, stopped by ``stop``."""

    async def stop(self) -> None:
        """Undo ``start``; called once, only on a stage whose ``start`` returned."""

    async def reload(self, change: Reload) -> None:
        """Apply the config values this stage owns (``change.applied``) to what runs."""

    def status(self) -> str:
        """What this stage adds to the daemon's status line now ("" for nothing)."""
        return ""


class Chain:
    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._started: list[Stage] = []

    async def start(self) -> None:
        """Start every stage in order; if one fails, stop the ones started, in reverse, and raise."""
        for stage in self.stages:
            try:
                await stage.start()
            except BaseException:
                await self.stop()
                raise
            self._started.append(stage)

    async def stop(self) -> list[BaseException]:
        """Stop the started stages in reverse order, each whatever the others did; their errors."""
        errors: list[BaseException] = []
        while self._started:
            stage = self._started.pop()
            try:
                await stage.stop()
            except Exception as exc:
                log.error("stopping %s failed: %s", stage.name, exc, exc_info=True)
                errors.append(exc)
        return errors

    async def reload(self, change: Reload) -> None:
        """Each started stage applies what it owns; one that fails does not keep the others from it."""
        for stage in self._started:
            try:
                await stage.reload(change)
            except Exception as exc:
                log.error("reload: %s failed to apply the change: %s", stage.name, exc, exc_info=True)

    def status(self) -> str:
        return "; ".join(s for s in (stage.status() for stage in self._started) if s)
