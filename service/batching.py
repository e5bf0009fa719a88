"""Batcher: one bounded queue per model version, drained by one worker into batched forward passes.

The worker runs whatever is queued the moment the model is free. It waits (at most max_delay,
counted from the oldest queued image) only while more requests for this model are still being
decoded, so a lone request on an idle model adds no waiting. Every job has its own future: a
failing batch is retried image by image, so one bad image fails alone and no caller hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service import metrics, tracing
from service.classifier import Classifier
from service.errors import (
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
    ServiceError,
    ShuttingDownError,
)
from service.inference import Answer, Explain, Explained, gather_first_error
from service.statistics import Statistics

log = logging.getLogger("convserve.batching")

T = TypeVar("T")


@dataclass(eq=False)
class Admission:
    """Queue places a request holds for images still on their way (being decoded)."""

    pending: int

    def take(self, count: int) -> None:
        if count > self.pending:
            raise ValueError(f"{count} images submitted on an admission for {self.pending}")
        self.pending -= count


@dataclass(eq=False)
class Job:
    array: np.ndarray  # (C, H, W) float32, normalized
    future: asyncio.Future[Answer]
    deadline: float  # time.monotonic()
    explain: Explain | None = None  # None: a plain prediction
    target: int | None = None
    trace: str | None = None  # the request span's traceparent: the batch span links to it
    arrived: float = field(default_factory=time.monotonic)
    taken: bool = False  # in a batch on its way through the model: it will be answered


class Batcher:
    """Queue + worker for one model version; inference runs on `executor`, off the event loop."""

    def __init__(
        self,
        classifier: Classifier,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
    ) -> None:
        self.classifier = classifier
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._incoming = 0
        self._running = 0
        self._alone = 0  # run_alone() work admitted and not yet finished
        self._wake = asyncio.Event()
        self._closed = False
        self._worker: asyncio.Task[None] | None = None
        self.formed: set[int] = set()  # batch sizes it ran: what a successor warms up
        self.statistics = Statistics()  # Triton's per-version statistics (service.statistics)
        self._labels = (classifier.name, str(classifier.version))
        # the labelled series this batcher updates on every batch, looked up once
        self._depth = metrics.QUEUE_DEPTH.labels(*self._labels)
        self._wait = metrics.QUEUE_WAIT.labels(*self._labels)
        self._batch_size = metrics.BATCH_SIZE.labels(*self._labels)
        self._images = metrics.IMAGES.labels(*self._labels)
        self._top = metrics.TOP_PROBABILITY.labels(*self._labels)
        metrics.QUEUE_CAPACITY.labels(*self._labels).set(max_queue)
        self._depth.set(0)
        for reason in metrics.REJECT_REASONS:  # series exist from the start, at zero
            metrics.REJECTED.labels(self._labels[0], reason)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher {self._labels}"
        )

    def has_room(self, count: int) -> bool:
        """Whether `count` more images would be admitted now (for work that may be skipped,
        such as a shadow run, rather than refused)."""
        queued = len(self._queue) + self._alone + self._incoming
        return not self._closed and queued + count <= self.max_queue

    @contextlib.contextmanager
    def incoming(self, count: int) -> Iterator[Admission]:
        """Admit `count` images of one request, before they are decoded: 503 at once when the
        queue, counting the images still decoding, has no room (a flood is refused before it
        costs a decode). While they decode, a forming batch waits for them.

        A request enters here right after it was routed to this version (with no await in
        between), so a version being retired waits for it instead of refusing it.
        """
        if self._closed:
            raise ShuttingDownError("the model version is being unloaded; retry", retry_after=1)
        queued = len(self._queue) + self._alone + self._incoming
        if queued + count > self.max_queue:
            metrics.REJECTED.labels(self._labels[0], metrics.QUEUE_FULL).inc()
            raise QueueFullError(
                f"the queue for {self._labels[0]} v{self._labels[1]} holds {queued} of "
                f"{self.max_queue} images (decoding or waiting); retry shortly",
                retry_after=1,
            )
        admission = Admission(count)
        self._incoming += count
        try:
            yield admission
        finally:
            self._incoming -= admission.pending
            self._wake.set()

    def submit(
        self,
        admission: Admission,
        arrays: Sequence[np.ndarray],
        deadline: float,
        explain: Explain | None = None,
        target: int | None = None,
        trace: str | None = None,
    ) -> list[Job]:
        """Queue one admitted request's images together."""
        admission.take(len(arrays))
        self._incoming -= len(arrays)
        loop = asyncio.get_running_loop()
        jobs = [
            Job(array, loop.create_future(), deadline, explain, target, trace) for array in arrays
        ]
        self._queue.extend(jobs)
        self._depth.set(len(self._queue))
        self._wake.set()
        return jobs

    async def run_alone(self, admission: Admission, work: Callable[[], T], deadline: float) -> T:
        """One admitted request's own pass through the model (the explorer's maps): it keeps
        its queue place, runs on the inference thread between batches, and is dropped unrun
        once its deadline has passed (504)."""
        admission.take(1)
        self._incoming -= 1

        def in_time() -> T:
            if time.monotonic() >= deadline:
                raise DeadlineExceededError("the request waited in the queue past its deadline")
            return work()

        self._alone += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, in_time)
            done, _ = await asyncio.wait({future}, timeout=max(deadline - time.monotonic(), 0.0))
            if not done:
                future.cancel()  # unrun if still queued; a running pass finishes unused
                metrics.REJECTED.labels(self._labels[0], metrics.DEADLINE).inc()
                raise DeadlineExceededError("no answer from the model before the deadline")
            return future.result()
        finally:
            self._alone -= 1

    async def results(self, jobs: list[Job], deadline: float) -> list[Answer]:
        """Every job's outcome, in order. Past the deadline, jobs still queued are dropped unrun
        (504); a request whose images are all in a running batch still gets its answer. A
        caller cancelled (its client hung up) cancels its jobs, so those still queued never run.
        A timer rather than a task and a wait: this runs once for every request."""
        expired = False

        def expire() -> None:
            nonlocal expired
            if not all(job.taken for job in jobs):
                expired = True
                for job in jobs:
                    job.future.cancel()  # the worker skips cancelled jobs; taken ones finish unused

        timer = asyncio.get_running_loop().call_later(max(deadline - time.monotonic(), 0.0), expire)
        try:
            return await gather_first_error([job.future for job in jobs])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not expired or (task is not None and task.cancelling()):
                raise
            metrics.REJECTED.labels(self._labels[0], metrics.DEADLINE).inc()
            raise DeadlineExceededError(
                "the request waited in the queue past its deadline"
            ) from None
        finally:
            timer.cancel()

    async def _wait_for_more(self) -> None:
        """Hold the batch while decodes are in flight, up to max_delay after the oldest arrival."""
        while self._queue and len(self._queue) < self.max_batch_size and self._incoming > 0:
            remaining = self._queue[0].arrived + self.max_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _take(self) -> list[Job]:
        """Up to max_batch_size jobs of the oldest job's kind; expired jobs get 504 here, unrun."""
        now = time.monotonic()
        batch: list[Job] = []
        kept: deque[Job] = deque()
        kind: Explain | bool | None = False
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():
                continue  # the caller gave up (deadline or disconnect)
            if job.deadline <= now:
                metrics.REJECTED.labels(self._labels[0], metrics.DEADLINE).inc()
                self.statistics.failed(1, now - job.arrived)
                job.future.set_exception(
                    DeadlineExceededError("the request waited in the queue past its deadline")
                )
                continue
            if kind is False:
                kind = job.explain
            if job.explain == kind and len(batch) < self.max_batch_size:
                job.taken = True
                batch.append(job)
            else:
                kept.append(job)
        self._queue = kept
        self._depth.set(len(self._queue))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._queue:
                await self._wake.wait()
                continue
            await self._wait_for_more()
            batch = self._take()
            if not batch:
                continue
            self._running += 1
            try:
                outcomes = await loop.run_in_executor(self.executor, self._execute, batch)
            except BaseException as exc:  # cancelled while running: nobody may hang
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ShuttingDownError("the model was unloaded"))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self._running -= 1
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _execute(self, batch: list[Job]) -> Sequence[Answer | ServiceError]:
        """Runs in the inference thread: one forward pass for the whole batch."""
        started = time.monotonic()
        size = len(batch)
        waits = [started - job.arrived for job in batch]
        for wait in waits:
            self._wait.observe(wait)
        explain = batch[0].explain
        arrays = [job.array for job in batch]
        try:
            if explain is None:
                probabilities = self.classifier.predict(arrays)
                ended = time.monotonic()
                outcomes = [
                    Answer(probabilities[i], size, ran=(started, ended)) for i in range(size)
                ]
            else:
                result = self.classifier.explain(
                    arrays, explain.method, explain.layer, [j.target for j in batch]
                )
                ended = time.monotonic()
                outcomes = [
                    Answer(
                        result.probabilities[i],
                        size,
                        Explained(result.grids[i], result.targets[i], result.point.layer),
                        ran=(started, ended),
                    )
                    for i in range(size)
                ]
        except Exception as exc:
            if size > 1:  # find the image at fault: the others still get their answers
                log.warning("batch of %d failed (%s); retrying image by image", size, exc)
                return [outcome for job in batch for outcome in self._execute([job])]
            log.exception("inference failed for %s v%s", *self._labels)
            self.statistics.ran(waits, time.monotonic() - started, 0)
            return [InferenceError(f"inference failed: {type(exc).__name__}: {exc}")]
        self.statistics.ran(waits, ended - started, size)
        kind = "predict" if explain is None else explain.method
        metrics.INFERENCE.labels(*self._labels, kind).observe(ended - started)
        attributes: dict[str, str | int] = {
            "convserve.model": self._labels[0],
            "convserve.version": self._labels[1],
            "convserve.batch_size": size,
            "convserve.kind": kind,
        }
        tracing.batch("batch", started, ended, [job.trace for job in batch], attributes)
        self._batch_size.observe(size)
        self.formed.add(size)
        self._images.inc(size)
        for outcome in outcomes:
            self._top.observe(float(outcome.probabilities.max()))
        return outcomes

    async def drain(self) -> None:
        """Take no new requests; finish those routed here already (decoding, queued, running)."""
        self._closed = True
        while self._incoming or self._queue or self._running or self._alone:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the model was unloaded"))
        self._queue.clear()
        self._depth.set(0)
