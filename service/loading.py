"""Loader: brings versions from the store into the catalog and takes them out again.

A version serves only after it was verified, loaded, given its engine and warmed up; a failed
load is recorded in the catalog with its reason and never replaces a working version. Which
version a request reaches is the catalog's business, not the loader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import Executor
from pathlib import Path

from service import metrics
from service.batching import Batcher
from service.catalog import Catalog, Deployment
from service.classifier import Classifier
from service.config import Settings
from service.errors import ModelLoadError, ServiceError
from service.graph_files import heatmaps_unavailable
from service.inference import Route
from service.memory import return_freed_memory
from service.prepared import batch_size, load_prepared
from service.store import ModelStore

log = logging.getLogger("convserve.catalog")  # the name its lines always had


def route_of(classifier: Classifier) -> Route:
    """What the request path needs of a version, in whichever process it runs."""
    spec = classifier.spec
    return Route(
        name=classifier.name,
        version=classifier.version,
        instance=uuid.uuid4().hex,
        input=spec.input,
        labels=list(spec.labels),
        heatmap_layer=spec.heatmap_layer,
        layers=list(classifier.layers),
        conv_layers=list(classifier.conv_layers),
        grid_cells=max((p.shape[1] * p.shape[2] for p in classifier.layers.values()), default=0),
        heatmaps_unavailable=heatmaps_unavailable(spec),
    )


def warm_up_sizes(max_batch_size: int, device: str, formed: set[int]) -> list[int]:
    """The batch sizes to run once before a version takes traffic. On a GPU, every size the
    batcher can form (kernels are chosen per shape). On a CPU, the largest first (torch's and
    ONNX Runtime's memory pools grow to it once) and then 1: measured on resnet18, every other
    size then runs its first batch as fast as its second (within 1.3x, the run-to-run noise),
    while warming all 32 sizes took 13 s of a 16 s start (docs/benchmarks.md#time-to-ready).
    The largest is the largest the model's serving versions actually `formed`, when they did:
    a version swapped in under load warms what the traffic needs, not a batch of 32 that
    competes with serving for the cores."""
    if device.startswith("cuda"):
        return list(range(1, max_batch_size + 1))
    largest = min(max(formed), max_batch_size) if formed else max_batch_size
    return sorted({largest, 1}, reverse=True)


def resolve_device(choice: str) -> str:
    """CONVSERVE_DEVICE as a device name. `auto` on a machine without an NVIDIA driver node is
    the CPU, found without importing torch (prepared versions serve without it)."""
    if choice == "cpu" or (choice == "auto" and not Path("/dev/nvidiactl").exists()):
        return "cpu"
    import torch  # only where a GPU may be present

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CONVSERVE_DEVICE=cuda but torch sees no CUDA device")
    return str(torch.device(choice))


class Loader:
    """Loads versions from the store on its own thread and retires the ones replaced."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        catalog: Catalog,
        device: str,
        inference: Executor,
        thread: Executor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.device = device
        self.inference = inference
        self.thread = thread
        # unloaded on request: the store watcher leaves them out until a load asks again
        self.unloaded: set[tuple[str, int]] = set()

    async def load_store(self) -> None:
        """Load every version of every configured model; failures are recorded, not raised."""
        names = list(self.settings.models) or self.store.names()
        self.catalog.configure(names)
        for name in names:
            metrics.MODEL_LOAD_FAILURES.labels(name)  # the series exists from the start, at zero
            self.catalog.add(name)
            versions = self.store.versions(name) if name in self.store.names() else []
            if not versions:
                log.error("model %s: no versions in the store %s", name, self.store.root)
            for version in versions:
                # a refusal is recorded in the catalog and logged by load()
                with contextlib.suppress(ModelLoadError, ServiceError):
                    await self.load(name, version)
        self.catalog.mark_started()

    async def load(self, name: str, version: int) -> Deployment:
        """Load (or reload) one version; a running one serves until the new one is ready.

        On failure the reason is recorded (GET /models shows it) and ModelLoadError raised;
        whatever served before keeps serving.
        """
        loop = asyncio.get_running_loop()
        self.unloaded.discard((name, version))
        with self.catalog.loading(name, version):  # ConflictError while it already loads
            metrics.MODEL_LOAD_FAILURES.labels(name)
            formed = self._formed(name)
            try:
                classifier, seconds = await loop.run_in_executor(
                    self.thread, self._build, name, version, formed
                )
            except (ModelLoadError, ServiceError) as exc:
                reason = exc.reason if isinstance(exc, ModelLoadError) else exc.detail
                self.catalog.record_failure(name, version, reason)
                metrics.MODEL_LOAD_FAILURES.labels(name).inc()
                log.error("model %s v%d refused: %s", name, version, reason)
                raise
        if self.settings.warmup:  # once on the serving thread too: torch sets up state per thread
            await loop.run_in_executor(self.inference, classifier.warm_up, [1])
        batcher = self._batcher(classifier)
        deployment = Deployment(classifier, batcher, route_of(classifier), seconds)
        batcher.start()
        old = self.catalog.install(deployment)  # new requests go to the new one
        labels = (name, str(version), classifier.spec.architecture, classifier.device_type)
        metrics.MODEL_INFO.labels(*labels).set(1)
        metrics.MODEL_LOAD.labels(name, str(version)).set(seconds)
        log.info("model %s v%d ready on %s in %.2fs", name, version, self.device, seconds)
        if old is not None:
            await self._retire(old)
        return deployment

    async def unload(self, name: str, version: int) -> None:
        """Stop routing to a version, let its queue finish, then free it."""
        deployment = self.catalog.remove(name, version)
        self.unloaded.add((name, version))
        classifier = deployment.classifier
        labels = (name, str(version), classifier.spec.architecture, classifier.device_type)
        metrics.MODEL_INFO.labels(*labels).set(0)
        await self._retire(deployment)
        log.info("model %s v%d unloaded", name, version)

    async def stop(self) -> None:
        for deployment in self.catalog.deployments():
            await deployment.batcher.drain()
            await deployment.batcher.stop()

    def _formed(self, name: str) -> set[int]:
        """The batch sizes the model's loaded versions have run."""
        deployments = [d for d in self.catalog.deployments() if d.classifier.name == name]
        return {size for deployment in deployments for size in deployment.batcher.formed}

    def _batch_size(self, classifier: Classifier) -> int:
        return batch_size(classifier.spec, self.settings)

    def _build(self, name: str, version: int, formed: set[int]) -> tuple[Classifier, float]:
        """Runs on the loader thread: verify, load (service.prepared, else in full with torch),
        choose the engine, warm up (warm_up_sizes)."""
        started = time.perf_counter()
        folder = self.store.path(name, version)
        classifier = load_prepared(folder, name, version, self.settings, self.device)
        if classifier is None:
            from service.network import full_load  # torch: only for what is not prepared

            classifier = full_load(folder, name, version, self.settings, self.device)
        if self.settings.warmup:
            sizes = warm_up_sizes(self._batch_size(classifier), self.device, formed)
            classifier.warm_up(sizes)
            log.info("model %s v%d warmed up at batch sizes %s", name, version, sizes)
        return classifier, time.perf_counter() - started

    def _batcher(self, classifier: Classifier) -> Batcher:
        overrides = classifier.spec.batching
        delay_ms = self.settings.max_delay_ms
        if overrides and overrides.max_delay_ms is not None:
            delay_ms = overrides.max_delay_ms
        return Batcher(
            classifier,
            self.inference,
            max_batch_size=self._batch_size(classifier),
            max_delay_s=delay_ms / 1000.0,
            max_queue=self.settings.max_queue,
        )

    async def _retire(self, deployment: Deployment) -> None:
        """Let queued requests finish on the old version, then free it."""
        await deployment.batcher.drain()
        await deployment.batcher.stop()
        deployment.classifier.release()
        if self.device.startswith("cuda"):
            from service.network import free_device_memory  # torch is loaded on a GPU

            free_device_memory()
        return_freed_memory()
