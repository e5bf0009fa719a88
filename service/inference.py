"""The request path below HTTP, the same in every process layout: route a request to a model
version, take its queue places, decode its images (in the decoder processes; small ones in a
front worker itself), run them through the model and wait for the answers within the deadline.

/predict, the V2 routes and the explorer are thin adapters over `Requests`. Where the model
lives is behind `Models`: in this process (service.local) or in the model process, reached
through shared memory (service.link). No torch and no litestar here: front workers import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import msgspec
import numpy as np
from prometheus_client import Histogram

from service import metrics, tracing
from service.answers import AnswerCache, Cached, digest
from service.capture import Capture
from service.config import Settings
from service.decoder import DecoderConfig
from service.decoding import DecodePool
from service.errors import (
    ConflictError,
    DeadlineExceededError,
    HeatmapsUnavailableError,
    ImageNotHeldError,
    InvalidParameterError,
    LayerNotFoundError,
    QueueFullError,
    ServiceError,
    ShuttingDownError,
)
from service.imaging import PreparedImage
from service.logs import CURRENT_REQUEST
from service.memory import Trimmer
from service.overlay import overlay_png
from service.small_images import SmallImages
from service.spec import InputSpec

log = logging.getLogger("convserve")
T = TypeVar("T")
OFF_LOOP_BYTES = 1 << 20  # images above this, all together, are hashed in a worker thread
IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # a kept image's sha256, in hex
DRAW: ContextVar[float | None] = ContextVar("convserve_rollout_draw", default=None)
_GOLDEN = (math.sqrt(5) - 1) / 2
_draws = itertools.count()
_first_draw = random.random()


def rollout_draw() -> float:
    """This request's draw (0..1) for a rollout's canary share and shadow sample. It is made
    once per request, so routing before and after the body is read agrees. The draws of a
    process are an evenly spread sequence (golden-ratio steps), so a 10% canary gets 10% of any
    run of requests, not only on average."""
    draw = DRAW.get()
    if draw is None:
        draw = (_first_draw + next(_draws) * _GOLDEN) % 1.0
        DRAW.set(draw)
    return draw


async def gather_first_error(futures: Sequence[asyncio.Future[T]]) -> list[T]:
    """Wait for all; raise the first failure (every outcome is retrieved, none left dangling)."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


class Route(msgspec.Struct, frozen=True):
    """What the request path needs to know of one serving version, in any process."""

    name: str
    version: int
    instance: str  # unique to this load of it: a reload or a restarted process is another
    input: InputSpec
    labels: list[str]
    heatmap_layer: str
    layers: list[str]  # heatmap layers, in execution order
    conv_layers: list[str]  # the layers among them the explorer can open
    grid_cells: int  # most cells (h * w) a heatmap of this version has
    heatmaps_unavailable: str | None = None  # why it has none (service.graph_files)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input.channels, self.input.height, self.input.width)

    def heatmap_point(self, layer: str | None) -> str:
        """The heatmap layer a request reads; 404 naming the valid ones otherwise."""
        self._check_heatmaps()
        name = layer or self.heatmap_layer
        if name not in self.layers:
            raise LayerNotFoundError(
                f"model {self.name} v{self.version} has no heatmap layer {name!r}; "
                f"valid layers: {', '.join(self.layers)}"
            )
        return name

    def conv_layer(self, layer: str) -> str:
        """A conv layer the explorer opens; 404 naming the conv layers otherwise."""
        self._check_heatmaps()
        if layer not in self.conv_layers:
            raise LayerNotFoundError(
                f"model {self.name} v{self.version} has no conv layer {layer!r}; "
                f"conv layers: {', '.join(self.conv_layers) or 'none'}"
            )
        return layer

    def _check_heatmaps(self) -> None:
        if self.heatmaps_unavailable is not None:
            raise HeatmapsUnavailableError(
                f"model {self.name} v{self.version} serves predictions but no heatmaps or layer "
                f"maps: {self.heatmaps_unavailable}"
            )

    def check_target(self, target: int | None) -> None:
        if target is not None and target >= len(self.labels):
            raise InvalidParameterError(
                f"target {target} is out of range: model {self.name} has "
                f"{len(self.labels)} classes (0..{len(self.labels) - 1})"
            )


class Explain(msgspec.Struct, frozen=True):
    """A heatmap job: which map, read at which layer. Jobs batch only with equal ones."""

    method: str  # "gradcam" | "activation"
    layer: str


@dataclass(frozen=True)
class Explained:
    grid: np.ndarray  # (h, w) float32 in 0..1
    target: int  # the class the map explains
    layer: str


@dataclass(frozen=True)
class Answer:
    """What one image gets back from its forward pass."""

    probabilities: np.ndarray  # (classes,) float32, sums to 1
    batch_size: int
    explained: Explained | None = None
    ran: tuple[float, float] = (0.0, 0.0)  # its forward pass began and ended (time.monotonic())


class Ticket(Protocol):
    """Queue places a request holds on one version while its images decode."""

    @property
    def route(self) -> Route: ...


class Models(Protocol):
    """Where the model versions live: this process, or the model process."""

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> list[tuple[str, int, str]]:
        """Every version loaded now, as (model, version, instance)."""
        ...

    async def route(self, name: str | None, version: str | None, draw: float = 1.0) -> Route:
        """The version a request reaches; `draw` is its rollout_draw() (1.0: never a canary)."""
        ...

    async def keep(self, digest: bytes, data: bytes) -> bool:
        """Hold an image for later requests that name it (False: not held, over the bounds)."""
        ...

    async def kept(self, digest: bytes) -> bytes | None: ...

    def admit(
        self, name: str | None, version: str | None, count: int, draw: float = 1.0
    ) -> AbstractAsyncContextManager[Ticket]:
        """Resolve the version and take `count` queue places (503 when full)."""
        ...

    async def run(
        self,
        ticket: Ticket,
        arrays: Sequence[np.ndarray],
        deadline: float,
        explain: Explain | None,
        target: int | None,
        trace: str | None = None,
    ) -> list[Answer]:
        """`trace`: the request span's W3C traceparent, which each batch span links to."""
        ...

    async def open_layer(
        self, ticket: Ticket, array: np.ndarray, layer: str, deadline: float
    ) -> bytes:
        """One conv layer laid open for one image, as LayerMaps JSON."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Image:
    """One image of a request: encoded bytes to decode, labelled for its errors."""

    label: str  # how errors name it: "body" or "file 2 (cat.jpg)"
    data: bytes


@dataclass(frozen=True)
class Classified:
    route: Route  # the version that answered (a swap may land while the body is read)
    answers: list[Answer]
    overlays: list[bytes | None]  # each heatmap as a PNG over its picture, when one was asked
    cached: bool = False  # answered from the response cache: no decode, no forward pass


def _record_passes(submitted: float, answers: Sequence[Answer]) -> None:
    """The request's wait in the queue and its forward passes, as children of its span."""
    passes = sorted({answer.ran for answer in answers})
    tracing.record("queue wait", submitted, passes[0][0])
    for started, ended in passes:
        size = max(a.batch_size for a in answers if a.ran == (started, ended))
        tracing.record("inference", started, ended, batch_size=size)


def _overlay(answer: Answer, prepared: PreparedImage | None) -> bytes | None:
    explained = answer.explained
    if explained is None or prepared is None or prepared.display is None:
        return None
    return overlay_png(prepared.display, prepared.box, explained.grid)


def _moved(first: Route, admitted: Route) -> bool:
    """Whether the version admitted is not the one routed to before the body was read (a swap
    or a reload landed meanwhile): cheap fields only, not the label lists."""
    return (first.name, first.version) != (admitted.name, admitted.version) or (
        first.input != admitted.input
    )


class Requests:
    """The request path of one HTTP process: decoding, drain state, and the models."""

    def __init__(
        self, settings: Settings, models: Models, small: SmallImages | None = None
    ) -> None:
        self.settings = settings
        self.models = models
        self.small = small  # front workers only: the single process decodes all in children
        config = DecoderConfig(settings.max_pixels, settings.formats, settings.decode_memory_mb)
        self.decoders = DecodePool(settings.decode_threads, config)
        # heatmap overlays: bounded drawing on pictures of at most 1024 px, off the event loop
        self.painters = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="convserve-paint"
        )
        self.trimmer = Trimmer(self.painters)
        self.answers = AnswerCache(settings.cache_entries, settings.cache_mb * 1024 * 1024)
        self.capture: Capture | None = None  # started with the decoders: only where they run
        self.draining = False
        self.inflight = 0

    async def start(self) -> None:
        await self.decoders.start()
        if self.settings.capture_dir is not None:
            self.capture = Capture(self.settings, self.settings.workers)

    async def keep(self, image: Image) -> str | None:
        """Hold one uploaded image in the model owner, so later requests from any worker may
        name it instead of sending it again: its id (the sha256 in hex), or None when not
        held (the response cache is off, or the image is larger than CONVSERVE_CACHE_MB)."""
        if not self.answers.enabled:
            return None
        key = await asyncio.to_thread(digest, image.data)
        return key.hex() if await self.models.keep(key, image.data) else None

    async def named(self, ident: str) -> Image:
        """The image a request names by the id a `keep` gave it."""
        if not IMAGE_ID.fullmatch(ident):
            raise InvalidParameterError(
                f"image={ident[:80]!r} is not an image id: the 64 hex digits of the Image-Id "
                "header a request with keep=true got back"
            )
        data = await self.models.kept(bytes.fromhex(ident))
        if data is None:
            raise ImageNotHeldError(
                f"image {ident[:12]}... is not held by this server (kept images are let go, "
                "oldest first, and a restart forgets them); send the image again"
            )
        return Image("body", data)

    def models_changed(self) -> None:
        """A version started or stopped serving: drop the cached answers of loads that ended."""
        self.answers.retain(self.models.loaded)

    @property
    def ready(self) -> bool:
        return self.models.ready and self.decoders.running and not self.draining

    def begin_drain(self) -> None:
        """Stop admitting predictions and report not ready; admitted requests still finish.
        Only a flag: it runs in a signal handler, which may have interrupted code holding the
        metrics' lock (setting a gauge there deadlocked a worker). note_drain() reports it."""
        self.draining = True

    def note_drain(self) -> None:
        """The drain in /metrics and the log: called from the event loop once it has begun."""
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

    def stop(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.trimmer.cancel()
        self.decoders.close()
        if self.small is not None:
            self.small.close()
        self.painters.shutdown(wait=False, cancel_futures=True)

    async def route(self, name: str | None, version: str | None) -> Route:
        """The version this request reaches, drawn once for a rollout's canary (rollout_draw)."""
        return await self.models.route(name, version, rollout_draw())

    async def route_body(
        self,
        name: str | None,
        version: str | None,
        read: Callable[[], Awaitable[T]],
        check: Callable[[Route], object] = lambda route: None,
    ) -> tuple[Route, T]:
        """Route and run the adapter's checks before the body arrives (a 404 or 503 costs the
        client no upload), then read it. classify() resolves again: a swap may land meanwhile."""
        route = await self.route(name, version)
        check(route)
        with tracing.span("read body"):
            return route, await read()

    async def receive(
        self,
        name: str | None,
        version: str | None,
        read: Callable[[], Awaitable[T]],
        check: Callable[[Route], object],
        *,
        small: bool,
    ) -> tuple[Route | None, T]:
        """route_body(), but a `small` body, one that came with the request's head, is read
        first and left unrouted (None): its admission routes it, one call to the model process
        fewer."""
        if not small:
            return await self.route_body(name, version, read, check)
        with tracing.span("read body"):
            return None, await read()

    async def prepare(
        self, route: Route, images: Sequence[Image], deadline: float, *, keep_display: bool
    ) -> list[PreparedImage]:
        """Decode + preprocess a request's images for this version: small ones here where this
        is a front worker (service.small_images), the rest in the decoder processes."""
        timing = metrics.PREPROCESS.labels(route.name, str(route.version))
        try:
            with tracing.span("decode and preprocess", images=len(images)):
                done = await self._prepare_small(route, images, keep_display, timing)
                rest = [index for index, prepared in enumerate(done) if prepared is None]
                decoded = await self.decoders.prepare(
                    [images[index].data for index in rest],
                    route.input,
                    deadline,
                    keep_display=keep_display,
                    labels=["" if images[i].label == "body" else images[i].label for i in rest],
                    timing=timing,
                )
        except DeadlineExceededError:
            metrics.REJECTED.labels(route.name, metrics.DEADLINE).inc()
            raise
        for index, prepared in zip(rest, decoded, strict=True):
            done[index] = prepared
        return cast("list[PreparedImage]", done)

    async def _prepare_small(
        self, route: Route, images: Sequence[Image], keep_display: bool, timing: Histogram
    ) -> list[PreparedImage | None]:
        """The images small enough to decode in this process (about 2 ms at most each), None
        for the others and where this process has no SmallImages; the decoders' own error for
        one refused here by its header or its first bytes."""
        done: list[PreparedImage | None] = [None] * len(images)
        if self.small is None:
            return done
        for index, image in enumerate(images):
            refused = self.small.refusal(image.data)
            if refused is None and self.small.accepts(image.data):
                started = time.perf_counter()
                found = await self.small.prepare(image.data, route.input, keep_display)
                if isinstance(found, PreparedImage):
                    timing.observe(time.perf_counter() - started)
                    metrics.SMALL_IMAGES.labels(route.name).inc()
                    done[index] = found
                refused = found if isinstance(found, ServiceError) else None
            if refused is not None:  # labelled as the decoders label theirs
                if image.label != "body":
                    refused.detail = f"{image.label}: {refused.detail}"
                raise refused
        return done

    async def classify(
        self,
        first: Route | None,
        name: str | None,
        version: str | None,
        items: Sequence[Image | np.ndarray],
        deadline: float,
        *,
        explain: Callable[[Route], Explain | None] = lambda route: None,
        target: int | None = None,
        paint: bool = False,
        check: Callable[[Route], object] = lambda route: None,
        capture: bool = True,
    ) -> Classified:
        """Images (bytes to decode, or (C, H, W) arrays already preprocessed) -> one answer
        each, in order, with its heatmap drawn over the picture when `paint`. `first` is the
        receive() route, None for a request its admission routes (model `name`). A request
        whose every image was answered before comes from the response cache. Images the
        capture rules pick are handed to its writer (service.capture) unless `capture` is
        False (the review page looking at what was captured)."""
        digests = await self._digests(items)
        if first is not None:
            found = self._cached(first, digests, explain, target)
            if found is not None:
                return found
        classified = await self._classify(
            first, name, version, items, digests, deadline, explain, target, paint, check
        )
        if classified.cached:
            return classified
        if digests is not None:
            route = classified.route
            keys = self.answers.keys(route, digests, explain(route), target)
            answered = zip(classified.answers, classified.overlays, strict=True)
            self.answers.store(keys, [Cached(a, o) for a, o in answered])
        if capture and self.capture is not None:
            self._capture(classified, items)
        return classified

    def _cached(
        self,
        route: Route,
        digests: list[bytes] | None,
        explain: Callable[[Route], Explain | None],
        target: int | None,
    ) -> Classified | None:
        """The request's answers from the response cache, when it holds every image's."""
        if digests is None:
            return None
        keys = self.answers.keys(route, digests, explain(route), target)
        found = self.answers.lookup(route.name, keys)
        if found is None:
            return None
        return Classified(route, [c.answer for c in found], [c.overlay for c in found], cached=True)

    def _capture(self, classified: Classified, items: Sequence[Image | np.ndarray]) -> None:
        """Offer the request's encoded images (not preprocessed tensors) to the capture."""
        assert self.capture is not None
        pairs = [(i.data, a.probabilities) for i, a in zip(items, classified.answers, strict=True)
                 if isinstance(i, Image)]  # fmt: skip
        if pairs:
            route = classified.route
            self.capture.offer(
                route.name, route.version, route.labels, [data for data, _ in pairs],
                [row for _, row in pairs], CURRENT_REQUEST.get(),
            )  # fmt: skip

    async def _digests(self, items: Sequence[Image | np.ndarray]) -> list[bytes] | None:
        """The response cache's keys for these images (None with the cache off); large bodies
        are hashed off the event loop (hashlib lets go of the interpreter lock)."""
        if not self.answers.enabled:
            return None
        data = [item.data if isinstance(item, Image) else item for item in items]
        size = sum(len(d) if isinstance(d, bytes) else d.nbytes for d in data)
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(lambda: [digest(d) for d in data])
        return [digest(d) for d in data]

    async def _classify(
        self,
        first: Route | None,
        name: str | None,
        version: str | None,
        items: Sequence[Image | np.ndarray],
        digests: list[bytes] | None,
        deadline: float,
        explain: Callable[[Route], Explain | None],
        target: int | None,
        paint: bool,
        check: Callable[[Route], object],
    ) -> Classified:
        """Decode and run. The queue places are taken before decoding, so a flood is refused
        before it costs a decode, and a forming batch knows these images are coming."""
        wanted = name if first is None else first.name
        async with contextlib.AsyncExitStack() as stack:
            admission = self.models.admit(wanted, version, len(items), rollout_draw())
            try:
                ticket = await stack.enter_async_context(admission)
            except QueueFullError:
                if first is None:  # routed now: checked and named as a routed request was
                    route = await self.route(name, version)
                    check(route)
                    found = self._cached(route, digests, explain, target)
                    if found is not None:
                        return found  # an answer the cache holds needs no queue place
                raise
            route = ticket.route
            if first is None:  # routed here: the checks and the cache receive() did not run
                check(route)
                found = self._cached(route, digests, explain, target)
                if found is not None:
                    return found  # the queue places, unused, are given back
            elif _moved(first, route):
                check(route)
                if route.input != first.input and any(
                    isinstance(item, np.ndarray) for item in items
                ):
                    raise ConflictError(
                        f"model {route.name} changed its input to v{route.version}'s while "
                        "the request was read; send it again"
                    )
            images = [item for item in items if isinstance(item, Image)]
            decoded = iter(await self.prepare(route, images, deadline, keep_display=paint))
            prepared: list[PreparedImage | None] = []
            arrays: list[np.ndarray] = []
            for item in items:
                if isinstance(item, Image):
                    image = next(decoded)
                    prepared.append(image)
                    arrays.append(image.array)
                else:
                    prepared.append(None)
                    arrays.append(item)
            submitted = time.monotonic()
            answers = await self.models.run(
                ticket, arrays, deadline, explain(route), target, tracing.traceparent()
            )
        if tracing.enabled():
            _record_passes(submitted, answers)
        overlays: list[bytes | None] = [None] * len(answers)
        if paint and any(answer.explained is not None for answer in answers):
            overlays = await self._paint(answers, prepared)
        return Classified(route, answers, overlays)

    async def _paint(
        self, answers: Sequence[Answer], prepared: Sequence[PreparedImage | None]
    ) -> list[bytes | None]:
        """Each heatmap drawn over its picture, in the painters' threads."""
        loop = asyncio.get_running_loop()
        pictures = [
            loop.run_in_executor(self.painters, _overlay, answer, image)
            for answer, image in zip(answers, prepared, strict=True)
        ]
        try:
            with tracing.span("overlay", images=len(pictures)):
                return [*await gather_first_error(pictures)]
        finally:
            self.trimmer.soon()  # gradients, displays and overlays: much memory, now free

    async def open_layer(
        self,
        first: Route | None,
        name: str | None,
        version: str | None,
        image: Image,
        layer: str,
        deadline: float,
        check: Callable[[Route], object],
    ) -> tuple[Route, bytes]:
        """The explorer: decode one image, then its own pass through the model, admitted on
        the version's queue (so retiring the version waits for it). `first` as classify's."""
        wanted = name if first is None else first.name
        async with contextlib.AsyncExitStack() as stack:
            admission = self.models.admit(wanted, version, 1, rollout_draw())
            try:
                ticket = await stack.enter_async_context(admission)
            except QueueFullError:
                if first is None:  # routed now: checked and named as a routed request was
                    check(await self.route(name, version))
                raise
            route = ticket.route
            if first is None or _moved(first, route):
                check(route)
            (prepared,) = await self.prepare(route, [image], deadline, keep_display=False)
            try:
                return route, await self.models.open_layer(ticket, prepared.array, layer, deadline)
            finally:
                self.trimmer.soon()  # the layer's maps: megabytes for a large network
