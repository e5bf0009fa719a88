"""Runtime: the models side of a process (settings, catalog and loader, inference and load
threads, store watching). The request path (service.inference) reaches it through service.local."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from service import metrics
from service.catalog import Catalog, Deployment
from service.config import Settings
from service.loading import Loader, resolve_device
from service.memory import trim_heap
from service.store import ModelStore
from service.watching import StoreWatcher

log = logging.getLogger("convserve")
DEVICE_MEMORY_EVERY_S = 1.0


class Runtime:
    """Built once per process that holds models; torn down by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.store = ModelStore(settings.store)
        # One inference thread: batches run back to back and torch gets every core for each.
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="convserve-infer")
        self.load_thread = ThreadPoolExecutor(1, thread_name_prefix="convserve-load")
        self.catalog = Catalog(settings.default_model, self.store.root)
        self.loader = Loader(
            settings, self.store, self.catalog, self.device, self.inference, self.load_thread
        )
        self.watcher = (
            StoreWatcher(self.loader, settings.watch_interval_s) if settings.watch else None
        )
        self.started_at = time.monotonic()
        self._loading: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None

    async def start(self) -> None:
        metrics.READY.set(0)
        loop = asyncio.get_running_loop()
        self._loading = loop.create_task(self._load())
        if self.device.startswith("cuda"):
            self._gauges = loop.create_task(self._device_memory())

    async def load_version(self, name: str, version: int) -> Deployment:
        """Load this one version and nothing else (`convserve predict`: no store scan, no
        watcher); the catalog then routes to it alone. ModelLoadError (or a ServiceError) when
        it is refused, logged as the server logs it."""
        self.catalog.configure([name])
        try:
            return await self.loader.load(name, version)
        finally:
            self.catalog.mark_started()

    async def loaded(self) -> None:
        """Wait until start-up loading has finished (ready, or every failure recorded)."""
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def _load(self) -> None:
        await self.loader.load_store()
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # collector, whose full passes over it stalled requests (p99 142 -> 37 ms, digits at 32
        # clients; docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        trim_heap()  # what loading and warm-up freed leaves the resident size
        if self.watcher is not None:
            self.watcher.start()
        status = self.catalog.status()
        loaded = ", ".join(f"{m.name} v{v}" for m in status.models.values() for v in m.loaded)
        elapsed = time.monotonic() - self.started_at
        if status.ready:
            log.info("ready in %.2fs: %s", elapsed, loaded or "no models")
            return
        missing = [name for name in status.configured
                   if name not in status.models or not status.models[name].loaded]  # fmt: skip
        log.error(
            "loaded in %.2fs but NOT ready: no version of %s serves (GET /models says why); "
            "serving: %s", elapsed, ", ".join(missing), loaded or "nothing",
        )  # fmt: skip

    async def _device_memory(self) -> None:
        """The CUDA allocator's total, for /metrics of whichever process answers the scrape."""
        import torch  # on a GPU every version is loaded in full, with torch

        gauge = metrics.DEVICE_MEMORY.labels(self.device)
        while True:
            gauge.set(torch.cuda.memory_allocated(self.device))
            await asyncio.sleep(DEVICE_MEMORY_EVERY_S)

    async def stop(self) -> None:
        for task in (self._loading, self._gauges):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.watcher is not None:
            await self.watcher.stop()
        await self.loader.stop()
        for pool in (self.inference, self.load_thread):
            pool.shutdown(wait=False, cancel_futures=True)
