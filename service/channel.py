"""The wire between a front worker and the model process.

Messages are msgpack frames (a little-endian u32 length, then the body) on a Unix socket;
nothing is pickled. Image arrays do not travel in them: each front worker owns an arena of
shared memory (a memfd, handed over once at connect with SCM_RIGHTS) and writes a request's
preprocessed arrays there; the model process reads them in place and writes the probabilities
(and heatmap grids) back into the same slot. A slot stays the worker's until the reply to the
call that used it has arrived, so the model process never writes into reused memory.
"""

from __future__ import annotations

import asyncio
import bisect
import mmap
import os
import struct
from typing import Any

import msgspec
import numpy as np

from service import errors
from service.errors import QueueFullError, ServiceError
from service.inference import Explain, Route

LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 30
PAGE = 4096


# ---- calls, from a front worker -----------------------------------------------------------


class Hello(msgspec.Struct, tag=True):
    pid: int
    arena_bytes: int


class Resolve(msgspec.Struct, tag=True):
    name: str | None
    version: str | None
    draw: float = 1.0  # the request's rollout draw (service.inference.rollout_draw)


class Admit(msgspec.Struct, tag=True):
    name: str | None
    version: str | None
    count: int
    draw: float = 1.0


class Run(msgspec.Struct, tag=True):
    """Run `count` admitted images from the arena at `offset` (float32, (count, C, H, W))."""

    ticket: int
    offset: int
    count: int
    explain: Explain | None
    target: int | None
    deadline: float  # time.monotonic(): one clock for every process on the machine
    trace: str | None = None  # the request span's W3C traceparent, when tracing


class OpenLayer(msgspec.Struct, tag=True):
    ticket: int
    offset: int
    layer: str
    deadline: float


class Release(msgspec.Struct, tag=True):
    """Give back an admission that will not run (its decode failed): no reply."""

    ticket: int


class Cancel(msgspec.Struct, tag=True):
    """The client hung up: stop the call if it still waits; its reply still comes."""

    call: int


class Forward(msgspec.Struct, tag=True):
    """An HTTP request for a route only the model process serves (cards, management)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None


class Status(msgspec.Struct, tag=True):
    pass


class Keep(msgspec.Struct, tag=True):
    """Hold an image's bytes for later requests that name it by digest (any worker's)."""

    digest: bytes
    data: bytes


class Kept(msgspec.Struct, tag=True):
    digest: bytes


Body = Resolve | Admit | Run | OpenLayer | Release | Cancel | Forward | Status | Keep | Kept


class Call(msgspec.Struct, array_like=True):
    id: int  # 0: no reply wanted
    body: Body


# ---- replies, from the model process ------------------------------------------------------


class Failure(msgspec.Struct):
    """A ServiceError raised in the model process, to raise again in the worker."""

    slug: str
    status: int
    title: str
    detail: str
    retry_after: float | None = None
    headers: dict[str, str] = {}


class Reply(msgspec.Struct, array_like=True):
    id: int
    result: msgspec.Raw  # the call's answer, msgpack; decoded by the caller, who knows its type
    failure: Failure | None = None


class Admitted(msgspec.Struct):
    ticket: int
    route: Route


class Ran(msgspec.Struct):
    """Answers are in the arena: probabilities (count, classes), then grids (count, h, w)."""

    batch_sizes: list[int]
    ran: list[tuple[float, float]]  # each image's forward pass: began, ended (time.monotonic())
    targets: list[int] | None = None
    grid: tuple[int, int] | None = None
    layer: str | None = None


class Forwarded(msgspec.Struct):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class ModelsStatus(msgspec.Struct):
    ready: bool
    loaded: list[tuple[str, int, str]]  # every version loaded: (model, version, instance)


def failure_of(exc: ServiceError) -> Failure:
    return Failure(
        exc.slug, exc.status_code, exc.title, exc.detail, exc.retry_after, dict(exc.headers)
    )


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _subclasses(sub)]


_BY_SLUG = {cls.slug: cls for cls in reversed(_subclasses(errors.ServiceError))}


def raise_failure(failure: Failure) -> None:
    """The same error class, detail and headers as the model process raised."""
    cls = _BY_SLUG.get(failure.slug, ServiceError)
    exc = cls(failure.detail, retry_after=failure.retry_after, headers=failure.headers)
    exc.status_code, exc.title = failure.status, failure.title
    raise exc


# ---- framing --------------------------------------------------------------------------------

encode = msgspec.msgpack.Encoder().encode
call_decoder = msgspec.msgpack.Decoder(Call)
reply_decoder = msgspec.msgpack.Decoder(Reply)
hello_decoder = msgspec.msgpack.Decoder(Hello)


def frame(message: Any) -> bytes:
    data = encode(message)
    return LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"a frame of {length} bytes is over the limit")
    return await reader.readexactly(length)


# ---- shared memory ------------------------------------------------------------------------


class Arena:
    """A front worker's shared memory: first-fit slots in one memfd. Pages are only backed
    once written, so a large arena costs what the requests in flight use."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        self.size = size
        if fd is None:
            fd = os.memfd_create("convserve-arena", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.memory = mmap.mmap(fd, size)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset

    def allocate(self, nbytes: int) -> int:
        length = max(PAGE, -(-nbytes // PAGE) * PAGE)
        for index, (offset, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[index]
                else:
                    self._free[index] = (offset + length, free - length)
                return offset
        raise QueueFullError(
            f"this worker's shared memory ({self.size >> 20} MiB) is full with requests in "
            "flight; retry shortly",
            retry_after=1,
        )

    def release(self, offset: int, nbytes: int) -> None:
        length = max(PAGE, -(-nbytes // PAGE) * PAGE)
        index = bisect.bisect(self._free, (offset, 0))
        self._free.insert(index, (offset, length))
        # merge with the neighbours
        if index + 1 < len(self._free) and offset + length == self._free[index + 1][0]:
            self._free[index] = (offset, length + self._free.pop(index + 1)[1])
        if index > 0:
            before, size = self._free[index - 1]
            if before + size == offset:
                self._free[index - 1] = (before, size + self._free.pop(index)[1])

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 view of the arena: no copy."""
        return np.ndarray(shape, dtype=np.float32, buffer=self.memory, offset=offset)
