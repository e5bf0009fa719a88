"""Shadow runs: a rollout's candidate also classifies a request the stable version answered,
off the request path, so that its agreement and latency show before it takes any traffic.

The client's answer never waits for the candidate. Its run goes through the candidate's own
batcher (the stable version's batches are untouched), on copies of the images, and is skipped
(counted, never an error) when the candidate's queue has no room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np

from service import metrics
from service.catalog import Deployment
from service.errors import DeadlineExceededError, ServiceError
from service.inference import Answer

log = logging.getLogger("convserve.shadow")


def top_label(labels: Sequence[str], answer: Answer) -> str:
    return labels[int(np.argmax(answer.probabilities))]


class Shadows:
    """The shadow runs in flight in the model owner; stop() cancels what is left."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.running: set[asyncio.Task[None]] = set()

    def offer(
        self, candidate: Deployment, arrays: Sequence[np.ndarray], served: Sequence[Answer],
        served_labels: Sequence[str],
    ) -> None:  # fmt: skip
        """Run `arrays` (copied now: the caller's memory is reused) through the candidate."""
        name = candidate.classifier.name
        if not candidate.batcher.has_room(len(arrays)):
            metrics.SHADOW_SKIPPED.labels(name, "queue").inc()
            return
        expected = [top_label(served_labels, answer) for answer in served]
        copies = [np.array(array, copy=True) for array in arrays]
        task = asyncio.get_running_loop().create_task(self._run(candidate, copies, expected))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _run(
        self, candidate: Deployment, arrays: list[np.ndarray], expected: list[str]
    ) -> None:
        name, version = candidate.classifier.name, str(candidate.version)
        batcher = candidate.batcher
        started = time.monotonic()
        try:
            with batcher.incoming(len(arrays)) as admission:
                jobs = batcher.submit(admission, arrays, started + self.deadline_s)
                answers = await batcher.results(jobs, started + self.deadline_s)
        except DeadlineExceededError:
            metrics.SHADOW_SKIPPED.labels(name, "deadline").inc()
            return
        except ServiceError as exc:
            metrics.SHADOW_SKIPPED.labels(name, "error").inc()
            log.warning("shadow run of %s v%s failed: %s", name, version, exc.detail)
            return
        metrics.SHADOW_SECONDS.labels(name, version).observe(time.monotonic() - started)
        labels = candidate.route.labels
        agreed = sum(top_label(labels, a) == e for a, e in zip(answers, expected, strict=True))
        metrics.SHADOW_IMAGES.labels(name, version).inc(len(answers))
        metrics.SHADOW_AGREED.labels(name, version).inc(agreed)

    async def stop(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
