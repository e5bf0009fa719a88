"""Models in this process: the catalog's versions behind the `Models` interface of the request
path. The single process serves through it, and so does the model process for its workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.answers import version_of
from service.batching import Admission
from service.catalog import Catalog, Deployment
from service.classifier import Classifier
from service.config import Settings
from service.errors import InferenceError, ModelLoadError
from service.inference import Answer, Explain, Route, Ticket
from service.lru import Lru
from service.memory import Trimmer
from service.shadowing import Shadows

KEPT_IMAGES = 64  # the page keeps one per picture shown; 64 serve a few people at once


@dataclass(eq=False)
class LocalTicket:
    route: Route
    deployment: Deployment
    admission: Admission
    shadow: Deployment | None = None  # a shadow rollout's candidate, to run these images too


def _local(ticket: Ticket) -> LocalTicket:
    assert isinstance(ticket, LocalTicket)
    return ticket


async def _network(classifier: Classifier) -> None:
    """Build a prepared version's network (importing torch, seconds) off the inference thread
    before a heatmap or layer-map pass needs it, so predictions keep flowing meanwhile."""
    if not classifier.has_network:
        try:
            await asyncio.to_thread(lambda: classifier.network)
        except ModelLoadError as exc:  # its files changed since it was loaded
            raise InferenceError(f"the network for this heatmap could not be built: {exc.reason}"
                                 ) from None  # fmt: skip


class LocalModels:
    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        # images a client asked to keep (`keep=true`), for every worker: their bytes by sha256
        self.images: Lru[bytes, bytes] = Lru(KEPT_IMAGES, settings.cache_mb << 20, len)
        # gradients and layer maps: much memory, given back once such answers go quiet
        self.trimmer = Trimmer()
        self.shadows = Shadows(settings.deadline_s)

    @property
    def ready(self) -> bool:
        return self.catalog.ready

    @property
    def loaded(self) -> list[tuple[str, int, str]]:
        return [version_of(deployment.route) for deployment in self.catalog.deployments()]

    async def keep(self, digest: bytes, data: bytes) -> bool:
        return self.images.put(digest, data)

    async def kept(self, digest: bytes) -> bytes | None:
        return self.images.get(digest)

    async def route(self, name: str | None, version: str | None, draw: float = 1.0) -> Route:
        return self.catalog.resolve(name, version, draw).route

    @asynccontextmanager
    async def admit(
        self, name: str | None, version: str | None, count: int, draw: float = 1.0
    ) -> AsyncIterator[LocalTicket]:
        deployment = self.catalog.resolve(name, version, draw)
        shadow = self.catalog.shadow(deployment, version, draw)
        # no await between routing and admission: a version being retired waits for this one
        with deployment.batcher.incoming(count) as admission:
            yield LocalTicket(deployment.route, deployment, admission, shadow)

    async def run(
        self,
        ticket: Ticket,
        arrays: Sequence[np.ndarray],
        deadline: float,
        explain: Explain | None,
        target: int | None,
        trace: str | None = None,
    ) -> list[Answer]:
        local = _local(ticket)
        batcher = local.deployment.batcher
        if explain is not None:
            await _network(local.deployment.classifier)
        jobs = batcher.submit(local.admission, arrays, deadline, explain, target, trace)
        try:
            answers = await batcher.results(jobs, deadline)
            if local.shadow is not None:  # before returning: the arrays' memory is reused
                self.shadows.offer(local.shadow, arrays, answers, local.route.labels)
            return answers
        finally:
            if explain is not None:
                self.trimmer.soon()

    async def open_layer(
        self, ticket: Ticket, array: np.ndarray, layer: str, deadline: float
    ) -> bytes:
        local = _local(ticket)
        classifier = local.deployment.classifier
        await _network(classifier)
        work = partial(classifier.layer_maps_json, array, layer)
        try:
            return await local.deployment.batcher.run_alone(local.admission, work, deadline)
        finally:
            self.trimmer.soon()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.trimmer.cancel()
        await self.shadows.stop()
