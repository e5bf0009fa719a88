"""The request path shared by every prediction API (REST, V2, the explorer): route to a version
around reading the body, decode in the decoder processes, queue on the model's batcher, wait for
the answers within the deadline. No HTTP here: the adapters pass in how to read their body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

from service import metrics
from service.api.uploads import Upload
from service.batching import Outcome, Task
from service.catalog import Deployment
from service.errors import DeadlineExceededError
from service.imaging import PreparedImage
from service.runtime import Runtime

T = TypeVar("T")


async def route_body(
    runtime: Runtime,
    name: str | None,
    version: str | None,
    read: Callable[[], Awaitable[T]],
    check: Callable[[Deployment], object] = lambda deployment: None,
) -> tuple[Deployment, T]:
    """Resolve the version and run the route's own checks before the body arrives (a 404 or 503
    costs the client no upload), read it, then resolve again: a swap may have landed meanwhile."""
    first = runtime.catalog.resolve(name, version)
    check(first)
    body = await read()
    latest = runtime.catalog.resolve(name, version)
    if latest is not first:
        check(latest)
    return latest, body


async def prepare_uploads(
    runtime: Runtime, deployment: Deployment, uploads: Sequence[Upload], deadline: float,
    *, keep_display: bool = False,
) -> list[PreparedImage]:  # fmt: skip
    """Decode + preprocess a request's images for this version, labelled for their errors."""
    classifier = deployment.classifier
    try:
        return await runtime.decoders.prepare(
            [upload.data for upload in uploads],
            classifier.spec.input,
            deadline,
            keep_display=keep_display,
            labels=["" if u.label == "body" else u.label for u in uploads],
            timing=metrics.PREPROCESS.labels(classifier.name, str(deployment.version)),
        )
    except DeadlineExceededError:
        metrics.REJECTED.labels(classifier.name, metrics.DEADLINE).inc()
        raise


async def classify(
    runtime: Runtime,
    deployment: Deployment,
    items: Sequence[Upload | np.ndarray],
    deadline: float,
    *,
    task: Task = None,
    target: int | None = None,
    keep_display: bool = False,
) -> tuple[list[Outcome], list[PreparedImage | None]]:
    """Images (bytes to decode, or (C, H, W) arrays already preprocessed) -> one outcome each,
    in order. The batcher knows they are coming while they decode, so a batch can wait."""
    batcher = deployment.batcher
    with batcher.incoming(len(items)) as admission:
        uploads = [item for item in items if isinstance(item, Upload)]
        decoded = iter(
            await prepare_uploads(runtime, deployment, uploads, deadline, keep_display=keep_display)
        )
        prepared: list[PreparedImage | None] = []
        arrays: list[np.ndarray] = []
        for item in items:
            if isinstance(item, Upload):
                image = next(decoded)
                prepared.append(image)
                arrays.append(image.array)
            else:
                prepared.append(None)
                arrays.append(item)
        jobs = batcher.submit(admission, arrays, deadline, task, target)
    return await batcher.results(jobs, deadline), prepared
