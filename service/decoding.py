"""DecodePool: every uploaded image is decoded in a decoder child process, fairly and in time.

Why children: a decode that allocates without bound (a bomb that slipped past every header
check) must not take down the process that holds the models and the queue. Each child
(service.decoder) runs under an address-space ceiling; one that fails or dies answers its
image with a 400 and is replaced. Why a deadline per decode: a C decoder cannot be interrupted,
but its process can be killed, so a decode past its request's deadline, or whose client went
away, stops at once and frees its decoder. Why turns: the next free decoder takes an image of
the request that has the fewest decoding, so one request with forty slow images cannot hold
every decoder while a one-image request waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

import msgspec
from prometheus_client import Histogram

from service import errors, metrics
from service.decoder import READY, Decoded, DecodeJob, DecoderConfig, decode_prepared
from service.errors import (
    DeadlineExceededError,
    InvalidImageError,
    ServiceError,
    ShuttingDownError,
)
from service.imaging import PreparedImage
from service.spec import InputSpec

log = logging.getLogger("convserve.decoding")
POLL_S = 0.05  # how often a waiting decode checks its deadline and its client
START_TIMEOUT_S = 60.0
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # far above any (C, H, W) input plus a 1024 px display
# One decode at a time per child, no thread pools inside it: the ceiling is per image.
DECODE_DEADLINE = "the request was still decoding its images past its deadline"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
ERRORS: dict[str, type[ServiceError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, ServiceError)
}


def _retrieve(future: asyncio.Future[PreparedImage | bytes]) -> None:
    """Mark an outcome as seen, so asyncio does not log it as an exception never retrieved."""
    if not future.cancelled():
        future.exception()


class Owner:
    """One request's share of the pool: its images take turns with other requests'."""


@dataclass(eq=False)
class Work:
    owner: Owner
    job: bytes  # an encoded DecodeJob
    deadline: float  # time.monotonic()
    timing: Histogram | None = None  # decode + preprocess seconds, observed per image
    future: Future[PreparedImage | bytes] = field(default_factory=Future)  # bytes: a PNG job
    cancelled: bool = False
    png: bool = False


class Child:
    """One decoder process and its socket."""

    def __init__(self, config: DecoderConfig) -> None:
        parent, child = socket.socketpair()
        with parent, child:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.decoder", msgspec.json.encode(config).decode(),
                 str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                env={**os.environ, **CHILD_ENV},
            )  # fmt: skip
            self.conn = Connection(parent.detach())
        if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv_bytes(16) != READY:
            self.kill()
            raise RuntimeError("a decoder process did not start")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.conn.close()


class DecodePool:
    """`size` decoder children, each driven by one thread of this process."""

    def __init__(self, size: int, config: DecoderConfig) -> None:
        self.size = size
        self.config = config
        self._jobs = msgspec.msgpack.Encoder()
        self._answers = msgspec.msgpack.Decoder(Decoded)
        self._lock = threading.Condition()
        self._pending: dict[Owner, deque[Work]] = {}  # requests in arrival order
        self._active: Counter[Owner] = Counter()
        self._children: list[Child | None] = [None] * size
        self._current: list[Work | None] = [None] * size  # what each slot is decoding
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def start(self) -> None:
        """Start every decoder (in parallel) and return once all of them answer."""
        loop = asyncio.get_running_loop()
        starts = [loop.run_in_executor(None, self._spawn, slot) for slot in range(self.size)]
        try:
            await asyncio.gather(*starts)
        except ShuttingDownError:
            return  # closed while starting
        for slot in range(self.size):
            thread = threading.Thread(
                target=self._drive, args=(slot,), name=f"convserve-decode-{slot}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = [work for queue in self._pending.values() for work in queue]
            self._pending.clear()
            self._lock.notify_all()
            children, self._children = self._children, [None] * self.size
        for work in pending:
            work.future.cancel()
        for child in children:
            if child is not None:
                child.kill()

    async def prepare(
        self,
        images: Sequence[bytes],
        spec: InputSpec,
        deadline: float,
        *,
        keep_display: bool = False,
        labels: Sequence[str] = (),
        timing: Histogram | None = None,
    ) -> list[PreparedImage]:
        """Decode one request's images; the first failure (labelled) stops the rest."""
        if not images:
            return []
        owner = Owner()
        works = [
            Work(owner, self._jobs.encode(DecodeJob(data, spec, keep_display)), deadline, timing)
            for data in images
        ]
        return cast("list[PreparedImage]", await self._decode(works, deadline, labels))

    async def png(self, data: bytes, deadline: float) -> bytes:
        """One image re-encoded as a PNG in a decoder, under the same ceiling and limits as a
        prediction's (the review page keeps labelled captures this way)."""
        job = self._jobs.encode(DecodeJob(data, None, keep_display=False))
        (encoded,) = await self._decode([Work(Owner(), job, deadline, png=True)], deadline)
        return cast("bytes", encoded)

    async def _decode(
        self, works: list[Work], deadline: float, labels: Sequence[str] = ()
    ) -> list[PreparedImage | bytes]:
        """Queue one owner's works and wait for every answer, in order."""
        owner = works[0].owner
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down; retry", retry_after=1)
            self._pending[owner] = deque(works)
            self._lock.notify_all()
        waiting = [asyncio.wrap_future(work.future) for work in works]
        for future in waiting:  # outcomes that arrive after the request gave up are not errors
            future.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
        except TimeoutError:
            raise DeadlineExceededError(DECODE_DEADLINE) from None
        finally:
            self.cancel(owner)  # whatever is still queued or running stops now
        results: list[PreparedImage | bytes] = []
        for index, future in enumerate(waiting):
            if not future.done() or future.cancelled():
                continue  # stopped because another image of this request failed
            exc = future.exception()
            if exc is not None:
                if isinstance(exc, ServiceError) and index < len(labels) and labels[index]:
                    exc.detail = f"{labels[index]}: {exc.detail}"
                raise exc
            results.append(future.result())
        if len(results) != len(works):  # the pool closed under it
            raise ShuttingDownError("the server is shutting down; retry", retry_after=1)
        return results

    def cancel(self, owner: Owner) -> None:
        """Drop an owner's queued images and stop its running ones (their children are killed)."""
        with self._lock:
            queued = self._pending.pop(owner, deque())
            for work in self._running_works(owner):
                work.cancelled = True
        for work in queued:
            work.future.cancel()

    # ---- the driver threads ----------------------------------------------------------------

    def _running_works(self, owner: Owner) -> list[Work]:
        return [w for w in self._current if w is not None and w.owner is owner]

    def _spawn(self, slot: int) -> Child:
        child = Child(self.config)
        with self._lock:
            if not self._closed:
                self._children[slot] = child
                return child
        child.kill()  # the pool closed while this one started: nobody would stop it
        raise ShuttingDownError("the server is shutting down; retry", retry_after=1)

    def _take(self, slot: int) -> Work | None:
        with self._lock:
            while not self._pending and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            owner = min(self._pending, key=lambda o: self._active[o])  # ties: oldest request
            queue = self._pending[owner]
            work = queue.popleft()
            if not queue:
                del self._pending[owner]
            self._active[owner] += 1
            self._current[slot] = work
            return work

    def _release(self, slot: int, work: Work) -> None:
        with self._lock:
            self._current[slot] = None
            self._active[work.owner] -= 1
            if self._active[work.owner] <= 0:
                del self._active[work.owner]

    def _drive(self, slot: int) -> None:
        while (work := self._take(slot)) is not None:
            try:
                self._run(slot, work)
            except Exception as exc:  # never lose a future: the caller gets an answer
                log.exception("decoder %d failed", slot)
                self._settle(work, ServiceError(f"decoding failed: {type(exc).__name__}"))
            finally:
                self._release(slot, work)

    def _run(self, slot: int, work: Work) -> None:
        if work.cancelled or work.future.cancelled():
            work.future.cancel()
            return
        if work.deadline <= time.monotonic():
            self._settle(work, DeadlineExceededError(DECODE_DEADLINE))
            return
        child = self._children[slot]
        if child is None or child.process.poll() is not None:
            child = self._spawn(slot)
        started = time.perf_counter()
        try:
            child.conn.send_bytes(work.job)
            while not child.conn.poll(POLL_S):
                stop = self._stop_reason(work)
                if stop is not None:
                    self._replace(slot, stop)
                    if stop == "deadline":
                        self._settle(work, DeadlineExceededError(DECODE_DEADLINE))
                    else:
                        work.future.cancel()
                    return
            answer = self._answers.decode(child.conn.recv_bytes(MAX_ANSWER_BYTES))
        except (EOFError, OSError):
            self._replace(slot, "died")
            detail = (
                "the image could not be decoded: its decoder stopped (the image needed more than "
                f"the {self.config.memory_mb} MB decode ceiling, CONVSERVE_DECODE_MEMORY_MB, or "
                "crashed the decoder)"
            )
            self._settle(work, InvalidImageError(detail))
            return
        if answer.exiting:
            self._replace(slot, "memory")
        if answer.error:
            error = ERRORS.get(answer.error, InvalidImageError)
            self._settle(work, error(answer.detail))
            return
        if work.timing is not None:
            work.timing.observe(time.perf_counter() - started)
        self._settle(work, answer.png if work.png else decode_prepared(answer))

    def _stop_reason(self, work: Work) -> str | None:
        if work.deadline <= time.monotonic():
            return "deadline"
        if work.cancelled or work.future.cancelled():
            return "cancelled"
        return None

    def _replace(self, slot: int, reason: str) -> None:
        """Kill a slot's child and start a fresh one (or leave it to the next image)."""
        child, self._children[slot] = self._children[slot], None
        if child is not None:
            child.kill()
        metrics.DECODER_RESTARTS.labels(reason).inc()
        log.warning("decoder %d replaced (%s)", slot, reason)
        if not self._closed:
            try:
                self._spawn(slot)
            except ShuttingDownError:
                pass
            except (OSError, RuntimeError) as exc:
                log.error("decoder %d did not restart (%s); the next image retries", slot, exc)

    @staticmethod
    def _settle(work: Work, outcome: PreparedImage | bytes | BaseException) -> None:
        if work.future.done():
            return
        with contextlib.suppress(Exception):  # cancelled meanwhile by its caller
            if isinstance(outcome, BaseException):
                work.future.set_exception(outcome)
            else:
                work.future.set_result(outcome)
