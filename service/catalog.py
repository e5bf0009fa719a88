"""Catalog: the model versions loaded in this process, their batchers, aliases and defaults.

A version serves only after it was verified, loaded and warmed up; a failed load is recorded
with its reason and never replaces a working version. Every routing change is one dict
assignment on the event loop, so a request sees either the old state or the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from service import metrics
from service.batching import Batcher
from service.classifier import Classifier
from service.config import Settings
from service.convolution import conv_layers
from service.engines import select_engine
from service.errors import (
    ConflictError,
    InvalidParameterError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServiceError,
    VersionNotFoundError,
)
from service.inference import Route
from service.memory import return_freed_memory
from service.spec import now_iso
from service.store import VERSION_PATTERN, ModelStore, check_name

log = logging.getLogger("convserve.catalog")
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def route_of(classifier: Classifier) -> Route:
    spec = classifier.spec
    return Route(
        name=classifier.name,
        version=classifier.version,
        input=spec.input,
        labels=list(spec.labels),
        heatmap_layer=spec.heatmap_layer,
        layers=list(classifier.layers),
        conv_layers=list(conv_layers(classifier)),
        grid_cells=max((p.shape[1] * p.shape[2] for p in classifier.layers.values()), default=0),
    )


@dataclass(eq=False)
class Deployment:
    """One version that is serving: classifier + batcher."""

    classifier: Classifier
    batcher: Batcher
    load_seconds: float
    loaded_at: str = field(default_factory=now_iso)

    @property
    def version(self) -> int:
        return self.classifier.version

    @functools.cached_property
    def route(self) -> Route:
        return route_of(self.classifier)


@dataclass(eq=False)
class ModelEntry:
    name: str
    deployments: dict[int, Deployment] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    aliases: dict[str, int] = field(default_factory=dict)
    default_version: int | None = None

    def serving_version(self) -> int | None:
        """The pinned default when it is loaded, else the highest loaded version."""
        if self.default_version in self.deployments:
            return self.default_version
        return max(self.deployments, default=None)


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """Every batch size the batcher can form: 1 .. max_batch_size."""
    return list(range(1, max_batch_size + 1))


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("CONVSERVE_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(choice)


class Catalog:
    """Loads versions from the store and routes requests to them."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        device: torch.device,
        inference: Executor,
        loader: Executor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.device = device
        self.inference = inference
        self.loader = loader
        self.models: dict[str, ModelEntry] = {}
        self.configured: list[str] = []
        self.started = False

    # ---- start-up -------------------------------------------------------------------------

    async def load_store(self) -> None:
        """Load every version of every configured model; failures are recorded, not raised."""
        names = list(self.settings.models) or self.store.names()
        self.configured = names
        for name in names:
            metrics.MODEL_LOAD_FAILURES.labels(name)  # the series exists from the start, at zero
            self.models.setdefault(name, ModelEntry(name))
            versions = self.store.versions(name) if name in self.store.names() else []
            if not versions:
                log.error("model %s: no versions in the store %s", name, self.store.root)
            for version in versions:
                # a refusal is recorded in the entry's failures and logged by load()
                with contextlib.suppress(ModelLoadError, ServiceError):
                    await self.load(name, version)
        self.started = True
        self.update_ready()

    @property
    def ready(self) -> bool:
        return self.started and all(
            name in self.models and self.models[name].deployments for name in self.configured
        )

    def update_ready(self) -> None:
        metrics.READY.set(1 if self.ready else 0)

    # ---- loading and unloading --------------------------------------------------------------

    def _batch_size(self, classifier: Classifier) -> int:
        overrides = classifier.spec.batching
        return (overrides and overrides.max_batch_size) or self.settings.max_batch_size

    def _build(self, name: str, version: int) -> tuple[Classifier, float]:
        """Runs on the loader thread: verify, load, warm up at every batch size it will serve."""
        started = time.perf_counter()
        classifier = self.store.load(name, version, self.device)
        policy = classifier.spec.engine or self.settings.engine
        if self.device.type != "cpu":
            policy = "torch"  # the ONNX engine here is ONNX Runtime's CPU provider
        classifier.engine = select_engine(
            classifier.module,
            classifier.torch_engine,
            classifier.input_shape,
            self.store.path(name, version),
            classifier.spec.sha256,
            policy,
            self.settings.threads,
            min(8, self._batch_size(classifier)),
        )
        if self.settings.warmup:
            classifier.warm_up(warm_up_sizes(self._batch_size(classifier)))
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

    async def load(self, name: str, version: int) -> Deployment:
        """Load (or reload) one version; a running one serves until the new one is ready.

        On failure the reason is recorded (GET /models shows it) and ModelLoadError raised;
        whatever served before keeps serving.
        """
        entry = self.models.setdefault(check_name(name), ModelEntry(name))
        metrics.MODEL_LOAD_FAILURES.labels(name)
        if version in entry.loading:
            raise ConflictError(f"model {name} v{version} is already loading")
        entry.loading.add(version)
        try:
            loop = asyncio.get_running_loop()
            classifier, seconds = await loop.run_in_executor(
                self.loader, self._build, name, version
            )
        except (ModelLoadError, ServiceError) as exc:
            reason = exc.reason if isinstance(exc, ModelLoadError) else exc.detail
            entry.failures[version] = reason
            metrics.MODEL_LOAD_FAILURES.labels(name).inc()
            log.error("model %s v%d refused: %s", name, version, reason)
            raise
        finally:
            entry.loading.discard(version)
        if self.settings.warmup:  # once on the serving thread too: torch sets up state per thread
            await loop.run_in_executor(self.inference, classifier.warm_up, [1])
        deployment = Deployment(classifier, self._batcher(classifier), seconds)
        deployment.batcher.start()
        old = entry.deployments.get(version)
        entry.deployments[version] = deployment  # the switch: new requests go to the new one
        entry.failures.pop(version, None)
        labels = (name, str(version), classifier.spec.architecture, self.device.type)
        metrics.MODEL_INFO.labels(*labels).set(1)
        metrics.MODEL_LOAD.labels(name, str(version)).set(seconds)
        log.info("model %s v%d ready on %s in %.2fs", name, version, self.device.type, seconds)
        self.update_ready()
        if old is not None:
            await self._retire(old)
        return deployment

    async def _retire(self, deployment: Deployment) -> None:
        """Let queued requests finish on the old version, then free it."""
        await deployment.batcher.drain()
        await deployment.batcher.stop()
        deployment.classifier.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return_freed_memory()

    async def unload(self, name: str, version: int) -> None:
        """Retire a version. The last version of a configured model stays: unloading it would
        take the model (and readiness) down; load its replacement first."""
        entry = self.entry(name)
        if version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version}")
        if name in self.configured and set(entry.deployments) == {version}:
            raise ConflictError(
                f"v{version} is the only loaded version of {name}; load another version first "
                "(a configured model always keeps one version serving)"
            )
        deployment = entry.deployments.pop(version)
        for alias, target in list(entry.aliases.items()):
            if target == version:
                del entry.aliases[alias]
        if entry.default_version == version:
            entry.default_version = None
        arch = deployment.classifier.spec.architecture
        metrics.MODEL_INFO.labels(name, str(version), arch, self.device.type).set(0)
        self.update_ready()
        await self._retire(deployment)
        log.info("model %s v%d unloaded", name, version)

    def set_default(self, name: str, version: int | None) -> None:
        """Pin the version served when a request names none (None: the highest loaded)."""
        entry = self.entry(name)
        if version is not None and version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version} to serve")
        entry.default_version = version

    def set_alias(self, name: str, alias: str, version: int) -> None:
        entry = self.entry(name)
        if not ALIAS_PATTERN.fullmatch(alias):
            raise InvalidParameterError(
                f"alias {alias!r} must start with a letter and use letters, digits, '_' or '-'"
            )
        if version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version} to alias")
        entry.aliases[alias] = version

    def delete_alias(self, name: str, alias: str) -> None:
        entry = self.entry(name)
        if entry.aliases.pop(alias, None) is None:
            raise VersionNotFoundError(f"model {name} has no alias {alias!r}")

    async def stop(self) -> None:
        for entry in self.models.values():
            for deployment in entry.deployments.values():
                await deployment.batcher.drain()
                await deployment.batcher.stop()

    # ---- routing ----------------------------------------------------------------------------

    def default_name(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        loaded = sorted(self.models) or sorted(self.configured)
        if not loaded:
            raise ModelNotFoundError(f"no models are loaded from {self.store.root}")
        return loaded[0]

    def entry(self, name: str | None) -> ModelEntry:
        name = name or self.default_name()
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"no model named {name!r}; loaded models: {known}")
        return entry

    def version_number(self, entry: ModelEntry, version: str | int | None) -> int:
        """A version given as a number, an alias or nothing (the serving version)."""
        if version is None or version == "":
            serving = entry.serving_version()
            if serving is None:
                if entry.loading or not self.started:
                    raise ModelNotReadyError(f"model {entry.name} is still loading", retry_after=2)
                reasons = "; ".join(f"v{v}: {r}" for v, r in sorted(entry.failures.items()))
                raise ModelNotReadyError(
                    f"model {entry.name} has no version that loaded ({reasons or 'none in store'})",
                    retry_after=30,
                )
            return serving
        if isinstance(version, int) or VERSION_PATTERN.fullmatch(version):
            return int(version)
        if version in entry.aliases:
            return entry.aliases[version]
        aliases = ", ".join(sorted(entry.aliases)) or "none"
        shown = repr(version) if len(version) <= 40 else repr(version[:37]) + "..."
        raise VersionNotFoundError(
            f"model {entry.name} has no version or alias {shown}; versions are numbers of at "
            f"most 9 ASCII digits, aliases: {aliases}"
        )

    def resolve(self, name: str | None, version: str | int | None) -> Deployment:
        entry = self.entry(name)
        number = self.version_number(entry, version)
        deployment = entry.deployments.get(number)
        if deployment is not None:
            return deployment
        if number in entry.loading:
            raise ModelNotReadyError(
                f"model {entry.name} v{number} is still loading", retry_after=2
            )
        if number in entry.failures:
            raise ModelNotReadyError(
                f"model {entry.name} v{number} failed to load: {entry.failures[number]}",
                retry_after=30,
            )
        loaded = ", ".join(str(v) for v in sorted(entry.deployments)) or "none"
        raise VersionNotFoundError(
            f"model {entry.name} has no version {number}; loaded versions: {loaded}"
        )
