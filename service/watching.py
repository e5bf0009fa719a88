"""Store watching (CONVSERVE_WATCH=1): versions that appear in the store are loaded as they come.

A version counts once its model.json exists (writers put it last; `convserve train` and
`import` rename a finished folder into place). A version that fails verification is recorded
and retried only when its files change, and never replaces a working version. A version
unloaded through the management API stays unloaded until a load asks for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from service.errors import ModelLoadError, ServiceError
from service.loading import Loader
from service.spec import SPEC_FILE
from service.store import WEIGHTS_FILE

log = logging.getLogger("convserve.watch")
Fingerprint = tuple[tuple[int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Size and modification time of a version's files: a change means it is worth a retry."""
    marks = []
    for name in (SPEC_FILE, WEIGHTS_FILE):
        with contextlib.suppress(OSError):
            stat = (folder / name).stat()
            marks.append((stat.st_size, stat.st_mtime_ns))
    return tuple(marks)


class StoreWatcher:
    """Polls the store every `interval` seconds and loads what is new."""

    def __init__(self, loader: Loader, interval: float) -> None:
        self.loader = loader
        self.interval = interval
        self.refused: dict[tuple[str, int], Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for name, model in self.loader.catalog.status().models.items():
            for version, state in model.versions.items():
                if state.reason is not None:  # refused at start-up: retry on change
                    folder = self.loader.store.root / name / str(version)
                    self.refused[(name, version)] = fingerprint(folder)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="store watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scan()
            except Exception:  # a bad scan must not end watching
                log.exception("store scan failed")

    async def scan(self) -> None:
        store = self.loader.store
        for name in store.names():
            for version in store.versions(name):
                if self._taken(name, version) or (name, version) in self.loader.unloaded:
                    continue
                folder = store.root / name / str(version)
                marks = fingerprint(folder)
                if self.refused.get((name, version)) == marks:
                    continue
                log.info("store watch: new version %s v%d", name, version)
                try:
                    await self.loader.load(name, version)
                    self.refused.pop((name, version), None)
                except (ModelLoadError, ServiceError):
                    self.refused[(name, version)] = marks

    def _taken(self, name: str, version: int) -> bool:
        """Loaded or loading now: asked per version, as a load may start while a scan awaits."""
        model = self.loader.catalog.status().models.get(name)
        state = model.versions.get(version) if model is not None else None
        return state is not None and state.state != "failed"
