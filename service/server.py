"""Running the app under uvicorn, with a drain on SIGTERM: not ready, finish admitted, exit 0.
The gRPC server (CONVSERVE_GRPC_PORT) runs in the same event loop and drains with it."""

from __future__ import annotations

import dataclasses
import logging
import resource
import signal
import socket
import time
from types import FrameType
from typing import Any

import grpc
import uvicorn

from service import tracing
from service.config import Settings
from service.inference import Requests
from service.protocols import HttpLimits, LimitedConfig

log = logging.getLogger("convserve")
SPARE_FILES = 256  # descriptors a worker needs besides connections: weights, logs, decoders


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before the usual graceful exit.

    On the signal the service reports not ready and refuses new predictions with 503 while every
    admitted request finishes, for at least CONVSERVE_DRAIN_DELAY_S so load balancers notice;
    then uvicorn closes its sockets and the process exits 0. A second signal exits at once.
    """

    def __init__(
        self, config: uvicorn.Config, requests: Requests, *, supervised: bool = False
    ) -> None:
        super().__init__(config)
        self.requests = requests
        self.supervised = supervised
        self.drain_deadline: float | None = None
        self.drain_earliest = 0.0
        self.drain_noted = False
        self.grpc: grpc.aio.Server | None = None
        self.failed = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the app's lifespan, the HTTP socket), then the gRPC server."""
        await super().startup(sockets)
        settings = self.requests.settings
        if self.should_exit or settings.grpc_port == 0:
            return
        from service.grpc_v2.server import start_grpc  # grpc's code only where it is served

        try:
            self.grpc = await start_grpc(
                settings, self.requests, self.config.app, shared=self.supervised
            )
        except OSError as exc:
            log.error("%s", exc)
            self.failed = True
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The drain has let every admitted request finish: the gRPC server stops (calls still
        running get what is left of CONVSERVE_DRAIN_S), then uvicorn's own shutdown."""
        if self.grpc is not None:
            grace = self.requests.settings.drain_s
            if self.drain_deadline is not None:
                grace = max(0.0, min(grace, self.drain_deadline - time.monotonic()))
            await self.grpc.stop(grace)
            self.grpc = None
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler: it may interrupt any code, so it only sets flags (no locks, no
        metrics, no logging); on_tick, on the event loop, acts on them."""
        if self.supervised and sig == signal.SIGINT:
            return  # Ctrl-C reaches the whole process group: the supervisor decides
        if self.drain_deadline is None and self.started:
            now = time.monotonic()
            settings = self.requests.settings
            self.drain_deadline = now + max(settings.drain_s, settings.drain_delay_s)
            self.drain_earliest = now + settings.drain_delay_s
            self.requests.begin_drain()
            return
        if not self.requests.draining:  # still starting: a start-up that waits gives up
            self.requests.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.requests.draining and not self.drain_noted:  # the handler only set a flag
            self.drain_noted = True
            self.requests.note_drain()
        if self.drain_deadline is not None and not self.should_exit:
            now = time.monotonic()
            done = self.requests.inflight == 0 and now >= self.drain_earliest
            if done or now >= self.drain_deadline:
                log.info("drained (%s); stopping", "all answered" if done else "deadline passed")
                self.should_exit = True
        return await super().on_tick(counter)


def file_limited(limits: HttpLimits) -> HttpLimits:
    """Raise the soft open-file limit to fit the connection cap, or lower the cap to fit it.

    A cap above what the process may open lets idle sockets take every descriptor, and then
    new clients fail at accept; the limit is inherited by worker processes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitting = max(1, soft - SPARE_FILES)
        log.warning(
            "open-file limit %d (ulimit -n) leaves room for %d connections, not "
            "CONVSERVE_MAX_CONNECTIONS=%d; capping at %d",
            soft,
            fitting,
            limits.max_connections,
            fitting,
        )
        return dataclasses.replace(limits, max_connections=fitting)
    return limits


def _config(settings: Settings, app: Any, **extra: Any) -> uvicorn.Config:
    return LimitedConfig(
        app,
        limits=file_limited(HttpLimits.from_settings(settings)),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_s) + 1,
        backlog=4096,
        timeout_keep_alive=30,
        **extra,
    )


def serve_single(settings: Settings) -> int:
    """`convserve serve` with CONVSERVE_WORKERS=0: the whole service in this one process."""
    from service.app import create_app  # front workers must not import torch

    tracing.configure("single")
    app = create_app(settings)
    server = DrainingServer(_config(settings, app), app.state.requests)
    server.run()
    return 1 if server.failed else 0


def serve_front(settings: Settings, app: Any, requests: Requests, listener: socket.socket) -> int:
    """One front worker on the supervisor's socket; it drains on SIGTERM like a single process."""
    server = DrainingServer(_config(settings, app), requests, supervised=True)
    server.run(sockets=[listener])
    return 1 if server.failed else 0
