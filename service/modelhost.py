"""The model process (`python -m service.modelhost SETTINGS SOCKET`): the one process per device
that holds the catalog, batchers, engines, heatmaps and explorer maps.

Front workers connect to its Unix socket (service.link). Their images reach the batchers
through shared memory, so a batch forms from the requests of every worker. Routes only this
process can answer (model cards, readiness per model, the management API, /schema) arrive as
forwarded HTTP requests and run through its own app, with no server of its own. It stops on
SIGTERM, which the supervisor sends once every worker has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from litestar import Litestar

from service import tracing
from service.api.framework import build_app
from service.api.routes import model_routes, request_routes
from service.channel import (
    Admit,
    Admitted,
    Arena,
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
    Reply,
    Resolve,
    Run,
    Status,
    call_decoder,
    failure_of,
    frame,
    hello_decoder,
    read_frame,
)
from service.config import Settings
from service.errors import ModelNotReadyError, ServiceError, ShuttingDownError
from service.inference import Requests, Ticket
from service.local import LocalModels
from service.logs import configure_logging
from service.routing_memory import RoutingMemory
from service.runtime import Runtime

log = logging.getLogger("convserve.models")
HANDSHAKE_S = 5.0
NOTHING = msgspec.Raw(msgspec.msgpack.encode(None))


class Session:
    """One front worker's connection: its calls, admissions and arena."""

    def __init__(
        self,
        models: LocalModels,
        app: Litestar,
        arena: Arena,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.models = models
        self.app = app
        self.arena = arena
        self.writer = writer
        self.tickets: dict[int, tuple[AbstractAsyncContextManager[Ticket], Ticket]] = {}
        self.calls: dict[int, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call = call_decoder.decode(await read_frame(reader))
                body = call.body
                if isinstance(body, Cancel):
                    task = self.calls.get(body.call)
                    if task is not None:
                        task.cancel()
                elif isinstance(body, Release):
                    await self._release(body.ticket)
                elif isinstance(body, (Resolve, Admit, Status)):
                    await self._answer(call)  # never suspends: no task for these
                else:
                    task = asyncio.create_task(self._answer(call))
                    self.calls[call.id] = task
                    task.add_done_callback(functools.partial(self._forget, call.id))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away
        except msgspec.DecodeError as exc:  # only our workers can connect: a bug, not a client
            log.error("a worker sent a frame that does not decode (%s); closing its link", exc)
        finally:
            for task in list(self.calls.values()):
                task.cancel()
            for ticket in list(self.tickets):
                await self._release(ticket)
            self.writer.close()

    def _forget(self, number: int, task: asyncio.Task[None]) -> None:
        self.calls.pop(number, None)

    async def _answer(self, call: Call) -> None:
        try:
            result: Any = await self._run(call.body)
            reply = Reply(call.id, msgspec.Raw(msgspec.msgpack.encode(result)))
        except ServiceError as exc:
            reply = Reply(call.id, NOTHING, failure_of(exc))
        except asyncio.CancelledError:
            reply = Reply(call.id, NOTHING, failure_of(ShuttingDownError("cancelled")))
        except Exception as exc:
            log.exception("call %s failed", type(call.body).__name__)
            reply = Reply(call.id, NOTHING, failure_of(ServiceError(f"internal error: {exc}")))
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.writer.write(frame(reply))

    async def _run(self, body: object) -> object:
        if isinstance(body, Resolve):
            return await self.models.route(body.name, body.version, body.draw)
        if isinstance(body, Admit):
            return await self._admit(body)
        if isinstance(body, Run):
            return await self._classify(body)
        if isinstance(body, OpenLayer):
            return await self._open_layer(body)
        if isinstance(body, Forward):
            return await forward(self.app, body)
        if isinstance(body, Status):
            return ModelsStatus(self.models.ready, self.models.loaded)
        if isinstance(body, Keep):
            return await self.models.keep(body.digest, body.data)
        if isinstance(body, Kept):
            return await self.models.kept(body.digest)
        raise ServiceError(f"unknown call {type(body).__name__}")

    async def _admit(self, body: Admit) -> Admitted:
        admission = self.models.admit(body.name, body.version, body.count, body.draw)
        ticket = await admission.__aenter__()
        number = next(self._ids)
        self.tickets[number] = (admission, ticket)
        return Admitted(number, ticket.route)

    async def _release(self, number: int) -> None:
        held = self.tickets.pop(number, None)
        if held is not None:
            await held[0].__aexit__(None, None, None)

    def _ticket(self, number: int) -> Ticket:
        if number not in self.tickets:  # a worker's admission from before a restart
            raise ModelNotReadyError("the model process restarted; retry", retry_after=1)
        return self.tickets[number][1]

    async def _classify(self, body: Run) -> Ran:
        try:
            ticket = self._ticket(body.ticket)
            route = ticket.route
            inputs = self.arena.array(body.offset, (body.count, *route.input_shape))
            answers = await self.models.run(
                ticket, list(inputs), body.deadline, body.explain, body.target, body.trace
            )
        finally:
            await self._release(body.ticket)
        classes = len(route.labels)
        out = self.arena.array(body.offset, (body.count, classes))
        for row, answer in zip(out, answers, strict=True):
            row[:] = answer.probabilities
        ran = Ran([answer.batch_size for answer in answers], [answer.ran for answer in answers])
        explained = [answer.explained for answer in answers if answer.explained is not None]
        if explained and len(explained) == len(answers):
            shape = (int(explained[0].grid.shape[0]), int(explained[0].grid.shape[1]))
            grids = self.arena.array(body.offset + out.nbytes, (body.count, *shape))
            for row, done in zip(grids, explained, strict=True):
                row[:] = done.grid
            ran.targets = [done.target for done in explained]
            ran.grid = shape
            ran.layer = explained[0].layer
        return ran

    async def _open_layer(self, body: OpenLayer) -> bytes:
        try:
            ticket = self._ticket(body.ticket)
            array = self.arena.array(body.offset, ticket.route.input_shape)
            return await self.models.open_layer(ticket, array, body.layer, body.deadline)
        finally:
            await self._release(body.ticket)


async def forward(app: Litestar, request: Forward) -> Forwarded:
    """Run one forwarded HTTP request through the app, in this process (no server)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": [(k, v) for k, v in request.headers],
        "client": request.client,
        "server": ("convserve-models", 0),
        "state": {},
    }
    sent = False
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # a forwarded request never disconnects early
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await app(scope, receive, send)  # type: ignore[arg-type]
    return Forwarded(status, headers, b"".join(chunks))


async def _handshake(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[Hello, int]:
    """The worker's hello and its arena's descriptor (SCM_RIGHTS)."""
    readable: asyncio.Future[None] = loop.create_future()

    def woken() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), woken)
    try:
        await asyncio.wait_for(readable, HANDSHAKE_S)
    finally:
        loop.remove_reader(conn.fileno())
    data, fds, _, _ = socket.recv_fds(conn, 1024, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("a worker connected without its shared memory")
    return hello_decoder.decode(data), fds[0]


class ModelHost:
    def __init__(self, settings: Settings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self.runtime = Runtime(settings)
        self.models = LocalModels(self.runtime.catalog, settings)
        # the model routes' dependency; this process never decodes, so it is never started
        requests = Requests(settings, self.models)

        # pins, aliases and rollouts, kept beside the socket for a model process started after
        # this one dies (service.routing_memory)
        memory = RoutingMemory(path.with_name("routing.json"), self.runtime.catalog)
        self.runtime.catalog.on_change.append(memory.changed)

        @asynccontextmanager
        async def lifespan(app: Litestar) -> AsyncIterator[None]:
            await self.runtime.start()
            try:
                yield
            finally:
                await self.models.stop()
                await self.runtime.stop()

        self.app = build_app(
            settings,
            request_routes() + model_routes(),
            {"runtime": self.runtime, "requests": requests},
            lifespan,
            draining=None,
        )
        self.sessions: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(256)
        listener.setblocking(False)
        async with self.app.lifespan():
            accepting = asyncio.create_task(self._accept(listener))
            await stop.wait()
            log.info("model process stopping")
            accepting.cancel()
            listener.close()
            for session in list(self.sessions):
                session.cancel()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._session(conn))
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            hello, fd = await _handshake(loop, conn)
        except (OSError, TimeoutError, msgspec.DecodeError, ConnectionError) as exc:
            log.warning("a worker's connection was refused: %s", exc)
            conn.close()
            return
        arena = Arena(hello.arena_bytes, fd)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        log.info("worker %d connected", hello.pid)
        await Session(self.models, self.app, arena, writer).serve(reader)
        log.info("worker %d disconnected", hello.pid)


def main(argv: list[str]) -> int:
    settings = Settings.from_env(json.loads(argv[0]))
    configure_logging(settings.log_format, settings.log_level)
    tracing.configure("model")
    uvloop.run(ModelHost(settings, Path(argv[1])).serve())  # as the workers' uvicorn runs
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
