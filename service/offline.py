"""`convserve predict`: files and folders classified in this process by the server's own parts.

The loader and catalog load the version (its engine chosen as the server chooses it), the
request path (service.inference) decodes each file in the decoder processes under the server's
limits, and the version's batcher runs the batches. Each file is one request of one image, so a
bad file fails alone, with the words the server's problem would use. A window of files is in
flight at once (two batches and one image per decoder): while a batch runs, the decoders
prepare the next one, so decoding overlaps inference. Rows come out in input order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.api.schemas import top_predictions
from service.config import Settings
from service.errors import InvalidImageError, PayloadTooLargeError, ServiceError
from service.inference import Explain, Image, Requests, Route
from service.local import LocalModels
from service.rows import Outcome
from service.runtime import Runtime
from service.store import ModelStore

log = logging.getLogger("convserve.offline")


@dataclass(frozen=True)
class Input:
    """One file to classify (or a folder that could not be listed: `problem` says why)."""

    path: Path  # as the user named it: the argument, joined with the path inside a folder
    name: str = ""  # its path below the folder every input shares: its heatmap's file name
    problem: str | None = None


@dataclass(frozen=True)
class Job:
    """What every file of the run gets: the version, the top-k and the heatmap wanted."""

    model: str | None
    version: int | None
    top_k: int
    heatmap: str | None  # "gradcam" | "activation"
    out: Path | None  # where heatmap pictures go


@dataclass(frozen=True)
class Summary:
    model: str
    version: int
    engine: str
    batch_size: int  # the largest batch the batcher may form
    largest: int  # the largest it formed
    files: int
    failed: int
    seconds: float  # from the first file taken to the last row written (loading not counted)


def _walk(folder: Path, skipped: Callable[[Path], bool],
          above: frozenset[tuple[int, int]] = frozenset()) -> Iterator[Input]:  # fmt: skip
    """Every file below `folder`: its files by name, then its sub-folders by name, each the
    same way. Hidden entries (.name) and the command's own output are left out; links are
    followed, except a link to a folder the walk is inside (`above`: it would never end).
    A folder that cannot be listed is an input with a problem: nothing is left out silently."""
    try:
        status = folder.stat()
        here = (status.st_dev, status.st_ino)
        if here in above:
            return
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        yield Input(folder, problem=_cannot(exc, "list the folder"))
        return
    folders = []
    for entry in entries:
        path = folder / entry.name
        if entry.name.startswith(".") or skipped(path):
            continue
        try:
            is_folder = entry.is_dir()  # through a link too
        except OSError:
            is_folder = False  # reading it will say what is wrong
        if is_folder:
            folders.append(path)
        else:
            yield Input(path)
    for path in folders:
        yield from _walk(path, skipped, above | {here})


def _absolute(path: Path) -> Path:
    """Absolute, with `..` and `.` taken out by the letter (links are not followed: a link to
    a file elsewhere is named where it was found)."""
    return Path(os.path.normpath(path.absolute()))


def find_inputs(paths: Sequence[Path], skip: Collection[Path] = ()) -> list[Input]:
    """Files in the order given, folders walked in sorted order, each named for its heatmap by
    its path below the folder all inputs share (so no two names collide). `skip`: files and
    folders a walk leaves out (the command's output); files named on the command line stay."""
    skipped_paths = {_absolute(path) for path in skip}

    def skipped(path: Path) -> bool:
        return _absolute(path) in skipped_paths

    found: list[Input] = []
    for path in paths:
        if path.is_dir():
            found += _walk(path, skipped)
        else:
            found.append(Input(path))
    if not found:
        shown = ", ".join(map(str, paths))
        raise ValueError(f"nothing to classify: {shown} holds no files (hidden ones are skipped)")
    absolute = [_absolute(item.path) for item in found]
    shared = os.path.commonpath([path.parent for path in absolute])
    return [
        Input(item.path, str(path.relative_to(shared)), item.problem)
        for item, path in zip(found, absolute, strict=True)
    ]


def _cannot(exc: OSError, what: str) -> str:
    return f"cannot {what}: {exc.strerror or type(exc).__name__}"


def read_file(path: Path, limit: int) -> bytes:
    """The file's bytes, at most `limit` (CONVSERVE_MAX_BODY_BYTES, the server's body limit)."""
    if not stat.S_ISREG(path.stat().st_mode):  # before opening: opening a pipe would wait
        raise InvalidImageError("not a regular file (a device, a pipe or a socket)")
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"the file exceeds the limit of {limit:,} bytes (CONVSERVE_MAX_BODY_BYTES)"
        )
    return data


def write_picture(target: Path, png: bytes) -> None:
    """The server's heatmap picture of one image, written to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)


class Run:
    """One `convserve predict`: the models side (Runtime), the request path, the files."""

    def __init__(self, settings: Settings, job: Job) -> None:
        self.settings = settings
        self.job = job
        self.runtime = Runtime(settings)
        self.models = LocalModels(self.runtime.catalog, settings)
        self.requests = Requests(settings, self.models)

    async def classify(
        self,
        inputs: Sequence[Input],
        open_rows: Callable[[Route, int], Callable[[Outcome], None]],
        done: Callable[[Outcome], None] = lambda outcome: None,
    ) -> Summary:
        """Load the version, then classify every input. Once loaded, `open_rows(route, count)`
        gives the function that writes the rows (in input order); `done` gets each outcome as
        it completes (progress)."""
        store = ModelStore(self.settings.store)
        name, number = store.resolve(self.job.model or self.settings.default_model,
                                     self.job.version)  # fmt: skip
        starting = asyncio.ensure_future(self.requests.start())  # decoders start while it loads
        try:
            try:
                deployment = await self.runtime.load_version(name, number)
            finally:
                await starting
            route = await self.models.route(name, str(number))
            batch = deployment.batcher.max_batch_size
            window = min(self.settings.max_queue, 2 * batch + self.settings.decode_threads)
            write = open_rows(route, len(inputs))
            started = time.monotonic()
            failed = await self._pipeline(route, inputs, window, write, done)
        finally:
            self.requests.stop()
            await self.models.stop()
            await self.runtime.stop()
        largest = max(deployment.batcher.formed, default=0)
        return Summary(route.name, route.version, deployment.classifier.engine.name, batch,
                       largest, len(inputs), failed, time.monotonic() - started)  # fmt: skip

    async def _pipeline(
        self,
        route: Route,
        inputs: Sequence[Input],
        window: int,
        write: Callable[[Outcome], None],
        done: Callable[[Outcome], None],
    ) -> int:
        """At most `window` files in flight; rows written in input order as they complete."""
        slots = asyncio.Semaphore(window)
        finished: dict[int, Outcome] = {}
        arrived = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        written = failed = 0

        async def one(index: int, item: Input) -> None:
            try:
                outcome = await self._one(route, item)
            except Exception as exc:  # a bug for one file must not hang or stop the run
                log.exception("%s failed", item.path)
                outcome = self._failed(route, item, f"internal error: {type(exc).__name__}")
            finally:
                slots.release()
            finished[index] = outcome
            arrived.set()
            done(outcome)

        def flush() -> None:
            nonlocal written, failed
            while written in finished:
                outcome = finished.pop(written)
                failed += outcome.error is not None
                write(outcome)
                written += 1

        for index, item in enumerate(inputs):
            await slots.acquire()
            flush()
            task = asyncio.create_task(one(index, item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while written < len(inputs):
            await arrived.wait()
            arrived.clear()
            flush()
        return failed

    def _failed(self, route: Route, item: Input, error: str) -> Outcome:
        return Outcome(str(item.path), route.name, route.version, [], error=error)

    async def _one(self, route: Route, item: Input) -> Outcome:
        """One file through the server's request path: read, decode, batch, top-k, heatmap."""
        if item.problem is not None:
            return self._failed(route, item, item.problem)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.deadline_s
        job = self.job
        try:
            data = await loop.run_in_executor(
                None, read_file, item.path, self.settings.max_body_bytes
            )
        except OSError as exc:
            return self._failed(route, item, _cannot(exc, "read the file"))
        except ServiceError as exc:
            return self._failed(route, item, exc.detail)
        method = job.heatmap

        def explain(version: Route) -> Explain | None:
            return None if method is None else Explain(method, version.heatmap_point(None))

        try:
            classified = await self.requests.classify(
                route, route.name, str(route.version), [Image("body", data)], deadline,
                explain=explain, paint=method is not None,
            )  # fmt: skip
        except ServiceError as exc:
            return self._failed(route, item, exc.detail)
        answer, overlay = classified.answers[0], classified.overlays[0]
        predictions = top_predictions(answer.probabilities, classified.route.labels, job.top_k)
        heatmap = None
        if method is not None and job.out is not None:
            assert overlay is not None
            target = job.out / f"{item.name}.png"
            try:
                await loop.run_in_executor(self.requests.painters, write_picture, target, overlay)
            except OSError as exc:
                return self._failed(route, item, _cannot(exc, f"write {target}"))
            heatmap = str(target)
        return Outcome(str(item.path), classified.route.name, classified.route.version,
                       predictions, heatmap)  # fmt: skip
