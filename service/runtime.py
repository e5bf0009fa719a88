"""Runtime: the live state routes work with (settings, catalog, thread pools, drain state)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from service import metrics
from service.catalog import Catalog, resolve_device
from service.config import Settings
from service.decoder import DecoderConfig
from service.decoding import DecodePool
from service.errors import ShuttingDownError
from service.memory import Trimmer, trim_heap
from service.store import ModelStore
from service.watching import StoreWatcher

log = logging.getLogger("convserve")


class Runtime:
    """Built once per app by create_app(); torn down by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.store = ModelStore(settings.store)
        # One inference thread: batches run back to back and torch gets every core for each.
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="convserve-infer")
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="convserve-load")
        # uploads decode in child processes under a memory ceiling (service.decoding)
        config = DecoderConfig(settings.max_pixels, settings.formats, settings.decode_memory_mb)
        self.decoders = DecodePool(settings.decode_threads, config)
        # heatmap overlays: bounded drawing on pictures of at most 1024 px, off the event loop
        self.painters = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="convserve-paint"
        )
        self.trimmer = Trimmer(self.painters)
        self.catalog = Catalog(settings, self.store, self.device, self.inference, self.loader)
        self.watcher = (
            StoreWatcher(self.catalog, settings.watch_interval_s) if settings.watch else None
        )
        self.draining = False
        self.inflight = 0
        self.started_at = time.monotonic()
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        metrics.READY.set(0)
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        await asyncio.gather(self.decoders.start(), self.catalog.load_store())
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # collector, whose full passes over it stalled requests (p99 142 -> 37 ms, digits at 32
        # clients; docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        trim_heap()  # what loading and warm-up freed leaves the resident size
        if self.watcher is not None:
            self.watcher.start()
        log.info(
            "ready in %.2fs: %s",
            time.monotonic() - self.started_at,
            ", ".join(
                f"{e.name} v{v}"
                for e in self.catalog.models.values()
                for v in sorted(e.deployments)
            )
            or "no models",
        )

    @property
    def ready(self) -> bool:
        return self.catalog.ready and self.decoders.running and not self.draining

    def begin_drain(self) -> None:
        """Stop admitting predictions and report not ready; admitted requests still finish."""
        self.draining = True
        metrics.READY.set(0)
        log.info("draining: %d request(s) in flight", self.inflight)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Admit one prediction request (503 while draining) and count it until it is answered."""
        if self.draining:
            raise ShuttingDownError(
                "the server is shutting down; retry on another instance", retry_after=1
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.catalog.stop()
        self.trimmer.cancel()
        self.decoders.close()
        for pool in (self.painters, self.inference, self.loader):
            pool.shutdown(wait=False, cancel_futures=True)
