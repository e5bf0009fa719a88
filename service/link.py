"""A front worker's way to the model process: the `Models` of the request path, over
service.channel. It reconnects by itself: while the model process is down (restarting, with
warm-up) calls get 503 at once and readiness is 503; nothing waits on a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from service.channel import (
    Admit,
    Admitted,
    Arena,
    Body,
    Call,
    Cancel,
    Forward,
    Forwarded,
    Hello,
    Keep,
    Kept,
    ModelsStatus,
    OpenLayer,
    Ran,
    Release,
    Resolve,
    Run,
    Status,
    encode,
    frame,
    raise_failure,
    read_frame,
    reply_decoder,
)
from service.errors import ModelNotReadyError
from service.inference import Answer, Explain, Explained, Route, Ticket

log = logging.getLogger("convserve.link")
R = TypeVar("R")
T = TypeVar("T")
RECONNECT_S = 0.1
STATUS_EVERY_S = 0.5
DOWN = "the model process is starting or restarting; retry shortly"


@dataclass(eq=False)
class RemoteTicket:
    route: Route
    number: int
    connection: int  # admissions live in one model process: a restarted one has none
    used: bool = False


class RemoteModels:
    """Calls to the model process; shared memory for the arrays both ways."""

    def __init__(self, path: Path, arena_bytes: int, on_status: Callable[[], None]) -> None:
        self.path = path
        self.arena = Arena(arena_bytes)
        self.on_status = on_status  # told whenever readiness may have changed
        self.connected = False
        self.models_ready = False
        self.loaded: list[tuple[str, int, str]] = []  # as the last status told (every 0.5 s)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._abandoned: dict[int, tuple[int, int]] = {}  # call -> arena slot, until its reply
        self._ids = itertools.count(1)
        self._connection = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.connected and self.models_ready

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def wait_ready(self, stop: Callable[[], bool]) -> None:
        while not self.ready and not stop():
            await asyncio.sleep(RECONNECT_S)

    # ---- the connection ---------------------------------------------------------------------

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(self.path))
                hello = encode(Hello(os.getpid(), self.arena.size))
                socket.send_fds(sock, [hello], [self.arena.fd])
                reader, self._writer = await asyncio.open_unix_connection(sock=sock)
            except OSError:
                sock.close()
                await asyncio.sleep(RECONNECT_S)
                continue
            self.connected = True
            self._connection += 1
            log.info("connected to the model process")
            polling = loop.create_task(self._poll_status())
            try:
                await self._read(reader)
            except Exception:
                log.exception("the model process's answer could not be read")
            finally:
                polling.cancel()
                self.connected = self.models_ready = False
                self._writer.close()
                self._writer = None
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(ModelNotReadyError(DOWN, retry_after=1))
                self._pending.clear()
                for slot in self._abandoned.values():  # nobody writes into them any more
                    self.arena.release(*slot)
                self._abandoned.clear()
                self.on_status()
            log.warning("lost the model process; reconnecting")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                reply = reply_decoder.decode(await read_frame(reader))
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
                abandoned = self._abandoned.pop(reply.id, None)
                if abandoned is not None:  # its caller gave up; the process is done with it
                    self.arena.release(*abandoned)

    async def _poll_status(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                status = await self._call(Status(), ModelsStatus)
                self.models_ready = status.ready
                self.loaded = status.loaded
                self.on_status()
            await asyncio.sleep(STATUS_EVERY_S if self.models_ready else RECONNECT_S)

    def _send(self, call: Call) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ModelNotReadyError(DOWN, retry_after=1)
        try:
            writer.write(frame(call))
        except (RuntimeError, ConnectionError):  # lost in the instant since the check
            raise ModelNotReadyError(DOWN, retry_after=1) from None

    async def _call(self, body: Body, kind: type[R], slot: tuple[int, int] | None = None) -> R:
        """One call and its reply. A caller that stops waiting (a hang-up) leaves its arena
        slot to be given back once the reply has come or the connection is gone: until then
        the model process may still write into it."""
        number = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._send(Call(number, body))
        except BaseException:
            future.cancel()
            raise
        self._pending[number] = future
        try:
            reply = await future
        except asyncio.CancelledError:
            if self._pending.pop(number, None) is not None:  # no reply yet: tell the process
                if slot is not None:
                    self._abandoned[number] = slot
                with contextlib.suppress(ModelNotReadyError):
                    self._send(Call(0, Cancel(number)))
            elif slot is not None:
                self.arena.release(*slot)
            raise
        if reply.failure is not None:
            raise_failure(reply.failure)
        return msgspec.msgpack.decode(reply.result, type=kind)

    def _remote(self, ticket: Ticket) -> RemoteTicket:
        assert isinstance(ticket, RemoteTicket)
        if ticket.connection != self._connection or not self.connected:
            raise ModelNotReadyError(f"the model process restarted; {DOWN}", retry_after=1)
        return ticket

    # ---- Models -------------------------------------------------------------------------------

    async def route(self, name: str | None, version: str | None, draw: float = 1.0) -> Route:
        return await self._call(Resolve(name, version, draw), Route)

    async def keep(self, digest: bytes, data: bytes) -> bool:
        return await self._call(Keep(digest, data), bool)

    async def kept(self, digest: bytes) -> bytes | None:
        return await self._call(Kept(digest), bytes | None)  # type: ignore[arg-type]

    @asynccontextmanager
    async def admit(
        self, name: str | None, version: str | None, count: int, draw: float = 1.0
    ) -> AsyncIterator[RemoteTicket]:
        admitted = await self._call(Admit(name, version, count, draw), Admitted)
        ticket = RemoteTicket(admitted.route, admitted.ticket, self._connection)
        try:
            yield ticket
        finally:
            if not ticket.used and ticket.connection == self._connection:
                with contextlib.suppress(ModelNotReadyError):
                    self._send(Call(0, Release(ticket.number)))

    async def run(
        self,
        ticket: Ticket,
        arrays: Sequence[np.ndarray],
        deadline: float,
        explain: Explain | None,
        target: int | None,
        trace: str | None = None,
    ) -> list[Answer]:
        remote = self._remote(ticket)
        route = remote.route
        count = len(arrays)
        classes = len(route.labels)
        cells = route.grid_cells if explain is not None else 0
        per_image = max(int(np.prod(route.input_shape)), classes + cells)
        nbytes = count * per_image * 4
        offset = self.arena.allocate(nbytes)
        try:
            inputs = self.arena.array(offset, (count, *route.input_shape))
            for row, array in zip(inputs, arrays, strict=True):
                row[:] = array
        except BaseException:
            self.arena.release(offset, nbytes)
            raise
        remote.used = True  # the model process gives the admission back after the run

        def answers(ran: Ran) -> list[Answer]:
            probabilities = self.arena.array(offset, (count, classes)).copy()
            sizes, times = ran.batch_sizes, ran.ran
            if ran.grid is None or ran.targets is None or ran.layer is None:
                return [
                    Answer(p, size, ran=when)
                    for p, size, when in zip(probabilities, sizes, times, strict=True)
                ]
            grids = self.arena.array(offset + probabilities.nbytes, (count, *ran.grid)).copy()
            layer = ran.layer
            return [
                Answer(p, size, Explained(grid, target_class, layer), ran=when)
                for p, size, grid, target_class, when in zip(
                    probabilities, sizes, grids, ran.targets, times, strict=True
                )
            ]

        call = Run(remote.number, offset, count, explain, target, deadline, trace)
        return await self._call_in_slot(call, Ran, offset, nbytes, answers)

    async def open_layer(
        self, ticket: Ticket, array: np.ndarray, layer: str, deadline: float
    ) -> bytes:
        remote = self._remote(ticket)
        nbytes = array.nbytes
        offset = self.arena.allocate(nbytes)
        self.arena.array(offset, array.shape)[:] = array
        remote.used = True
        call = OpenLayer(remote.number, offset, layer, deadline)
        return await self._call_in_slot(call, bytes, offset, nbytes, lambda body: body)

    async def _call_in_slot(
        self, body: Body, kind: type[R], offset: int, nbytes: int, read: Callable[[R], T]
    ) -> T:
        """A call whose arrays are in the slot at `offset`: `read` takes the answers out of it
        before the slot is given back."""
        try:
            result = await self._call(body, kind, (offset, nbytes))
        except asyncio.CancelledError:
            raise  # _call gives the slot back when the reply comes
        except BaseException:
            self.arena.release(offset, nbytes)
            raise
        try:
            return read(result)
        finally:
            self.arena.release(offset, nbytes)

    async def forward(self, request: Forward) -> Forwarded:
        return await self._call(request, Forwarded)
