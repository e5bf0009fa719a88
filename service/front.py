"""A front worker (`python -m service.front SETTINGS FD SOCKET WAIT`): HTTP, validation, decoding
and preprocessing on the supervisor's listening socket, without torch.

Predictions, V2 inference and the explorer run here up to the forward pass, which the model
process does for every worker (service.link). Every other route (model cards, readiness per
model, the management API, /schema) is forwarded to the model process as it came, so the
catalog has one owner. Liveness, /metrics and the pages are answered here.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, NotFoundException
from litestar.types import ASGIApp, Receive, Scope, Send

from service import metrics, tracing
from service.api.access import access_middleware
from service.api.dependencies import RequestsDep
from service.api.framework import build_app
from service.api.openapi import problems
from service.api.routes import request_routes
from service.channel import Forward, Forwarded
from service.config import Settings
from service.errors import (
    ModelNotReadyError,
    PayloadTooLargeError,
    ServiceError,
    ShuttingDownError,
)
from service.imaging import DecodeLimits
from service.inference import Requests
from service.link import DOWN, RemoteModels
from service.logs import configure_logging
from service.problems import PROBLEM_TYPE, problem_json
from service.server import serve_front
from service.small_images import SmallImages

ARENA_BYTES = 1 << 30  # shared memory per worker; only what requests in flight write is backed
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}


def _link(requests: Requests) -> RemoteModels:
    models = requests.models
    assert isinstance(models, RemoteModels)
    return models


@get(
    "/health/ready",
    summary="Every configured model has a ready version (503 otherwise)",
    responses=problems(503),
)
async def ready(request: Request[Any, Any, Any], requests: RequestsDep) -> Response[bytes]:
    """This worker's own state first (draining, the model process reachable), then the model
    process's answer, which names the models."""
    if requests.draining:
        raise ShuttingDownError("shutting down: finishing admitted requests", retry_after=1)
    link = _link(requests)
    if not link.connected:
        raise ModelNotReadyError(f"not ready: {DOWN}", retry_after=1)
    # the model process names what it waits for; past that, this worker's decoders too
    answer = await link.forward(_forward(cast("Scope", request.scope), b""))
    if answer.status == 200 and not requests.ready:
        raise ModelNotReadyError("not ready: this worker is starting", retry_after=1)
    return Response(answer.body, status_code=answer.status, headers=_headers(answer))


def _forward(scope: Scope, body: bytes) -> Forward:
    raw = cast("dict[str, Any]", scope)
    headers = [(k, v) for k, v in raw["headers"] if k.lower() not in HOP_BY_HOP]
    client = raw.get("client")
    return Forward(
        raw["method"],
        raw["path"],
        raw.get("query_string", b""),
        headers,
        body,
        (str(client[0]), int(client[1])) if client else None,
    )


def _headers(answer: Forwarded) -> dict[str, str]:
    return {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in answer.headers
        if k.lower() not in HOP_BY_HOP and k.lower() != b"content-length"
    }


class Dispatch:
    """Routes this worker serves go to its app; the rest to the model process, as they came."""

    def __init__(self, local: Litestar, requests: Requests) -> None:
        self.local = local
        self.requests = requests

    def _served_here(self, method: str, path: str) -> bool:
        try:
            self.local.asgi_router.handle_routing(path, method)
        except NotFoundException:
            return False
        except HTTPException:
            return True  # a route of ours, for another method: ours to answer 405
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = cast("dict[str, Any]", scope)
        if raw["type"] != "http" or self._served_here(raw["method"], raw["path"]):
            await self.local(scope, receive, send)
            return
        try:
            body = await _read(receive, self.requests.settings.max_body_bytes)
            answer = await _link(self.requests).forward(_forward(scope, body))
        except ServiceError as exc:
            await _problem(send, exc, raw["path"])
            return
        headers = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = cast("dict[str, Any]", await receive())
        if message["type"] == "http.disconnect":
            break
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body is over {limit} bytes (CONVSERVE_MAX_BODY_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _problem(send: Send, exc: ServiceError, path: str) -> None:
    body = problem_json(exc.status_code, exc.title, exc.slug, exc.detail, path)
    headers = [(b"content-type", PROBLEM_TYPE.encode()), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_front_app(
    settings: Settings, socket_path: Path, *, wait_for_models: bool = False
) -> tuple[ASGIApp, Requests]:
    """The worker's ASGI app. `wait_for_models` finishes start-up only once the model process
    is ready: a replacement worker takes no connection it could only answer with 503."""

    def readiness_changed() -> None:  # and what is loaded: told at every status poll
        metrics.READY.set(1 if requests.ready else 0)
        requests.models_changed()

    link = RemoteModels(socket_path, ARENA_BYTES, readiness_changed)
    requests = Requests(settings, link, SmallImages(DecodeLimits.from_settings(settings)))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        metrics.READY.set(0)
        await link.start()
        await requests.start()
        if wait_for_models:  # until the model process is ready, or a signal says stop
            await link.wait_ready(lambda: requests.draining)
        try:
            yield
        finally:
            requests.stop()
            await link.stop()

    # no OpenAPI document here: /schema is forwarded to the model process, which has every route
    local = build_app(
        settings, [*request_routes(), ready], {"requests": requests}, lifespan, None, openapi=False
    )
    app = access_middleware(
        cast("ASGIApp", Dispatch(local, requests)),
        draining=lambda: requests.draining,
        resolve=link.route,
    )
    return app, requests


def main(argv: list[str]) -> int:
    settings = Settings.from_env(json.loads(argv[0]))
    configure_logging(settings.log_format, settings.log_level)
    tracing.configure("front")
    listener = socket.socket(fileno=int(argv[1]))
    app, requests = create_front_app(settings, Path(argv[2]), wait_for_models=argv[3] == "1")
    return serve_front(settings, app, requests, listener)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
