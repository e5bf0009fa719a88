"""The request path shared by every prediction API: decode in the thread pool, queue on the
model's batcher, wait for the answers within the deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from service import metrics
from service.api.uploads import Upload
from service.batching import Outcome, Task, gather_first_error
from service.catalog import Deployment
from service.errors import ServiceError
from service.imaging import DecodeLimits, PreparedImage, prepare_image
from service.runtime import Runtime


def _prepare(
    runtime: Runtime, deployment: Deployment, upload: Upload, keep_display: bool
) -> PreparedImage:
    """Decode + preprocess one image (runs in the decode thread pool)."""
    started = time.perf_counter()
    spec = deployment.classifier.spec.input
    try:
        limits = DecodeLimits.from_settings(runtime.settings)
        prepared = prepare_image(upload.data, spec, limits, keep_display=keep_display)
    except ServiceError as exc:
        if upload.label != "body":
            exc.detail = f"{upload.label}: {exc.detail}"
        raise
    labels = (deployment.classifier.name, str(deployment.version))
    metrics.PREPROCESS.labels(*labels).observe(time.perf_counter() - started)
    return prepared


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
    loop = asyncio.get_running_loop()
    batcher = deployment.batcher
    with batcher.incoming(len(items)):
        pool = runtime.decoders
        decoding: list[asyncio.Future[PreparedImage]] = [
            loop.run_in_executor(pool, _prepare, runtime, deployment, item, keep_display)
            for item in items
            if isinstance(item, Upload)
        ]
        decoded = iter(await gather_first_error(decoding))
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
        jobs = batcher.submit(arrays, deadline, task, target)
    return await batcher.results(jobs, deadline), prepared
