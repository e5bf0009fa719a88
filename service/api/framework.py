"""What every convserve app shares, whichever process serves it: where errors become
problem+json, the access middleware, the OpenAPI document. No torch here (front workers)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from http import HTTPStatus
from typing import Any, cast

from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler, Message, Scope, Send

from service import __version__
from service.api.access import CLIENT_METHOD, Resolve, access_middleware
from service.api.viewer import render_plugins
from service.config import Settings
from service.errors import ServiceError
from service.problems import PROBLEM_TYPE, problem_json

log = logging.getLogger("convserve")


def problem_response(
    status: int,
    title: str,
    slug: str,
    detail: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = problem_json(status, title, slug, detail, instance)
    return Response(body, status_code=status, media_type=PROBLEM_TYPE, headers=headers)


def _service_error(request: Request[Any, Any, Any], exc: ServiceError) -> Response[bytes]:
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return problem_response(
        exc.status_code, exc.title, exc.slug, exc.detail, request.url.path, headers
    )


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    details = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            key = item.get("key", "")
            details.append(f"{key}: {item.get('message', '')}" if key else str(item.get("message")))
    detail = "; ".join(details) or str(exc.detail)
    return problem_response(422, "Invalid parameter", "invalid-parameter", detail, request.url.path)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    slug = title.lower().replace(" ", "-")
    detail = (
        str(exc.detail) if exc.detail and exc.detail != title else f"{title}: {request.url.path}"
    )
    if status == 404:
        detail = f"no route {request.method} {request.url.path}; see /schema for the API"
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return problem_response(status, title, slug, detail, request.url.path, headers or None)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        "Internal error",
        "internal-error",
        "an internal error occurred; it was logged",
        request.url.path,
    )


class Service(Litestar):
    """Litestar, answering HEAD wherever GET is routed: the GET's status and headers, no body
    (RFC 9110 9.3.2, as Starlette and Django do). Litestar routes HEAD only to handlers declared
    for it, so health checks and probes that send HEAD got 405."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await super().__call__(scope, receive, send)
            return
        # a copy: the server's own scope still says HEAD, so it sends no body either
        as_get = {**scope, "method": "GET", CLIENT_METHOD: "HEAD"}
        await super().__call__(cast("Scope", as_get), receive, _without_body(send))


def _without_body(send: Send) -> Send:
    async def send_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = cast("Message", {**message, "body": b""})
        await send(message)

    return send_head


def build_app(
    settings: Settings,
    handlers: Sequence[ControllerRouterHandler],
    provided: dict[str, object],
    lifespan: Callable[[Litestar], AbstractAsyncContextManager[None]],
    draining: Callable[[], bool] | None,
    *,
    resolve: Resolve | None = None,
    openapi: bool = True,
) -> Litestar:
    """A Litestar app with convserve's error handling. `provided` becomes its dependencies;
    `draining` None leaves out the access middleware (the model process's internal app: the
    front worker that forwarded a request logs it); `resolve` lets it name the model of a
    refused prediction."""
    middleware = (
        []
        if draining is None
        else [DefineMiddleware(access_middleware, draining=draining, resolve=resolve)]
    )
    app = Service(
        route_handlers=list(handlers),
        dependencies={
            key: Provide(_constant(value), sync_to_thread=False) for key, value in provided.items()
        },
        lifespan=[lifespan],
        exception_handlers={
            ServiceError: _service_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        middleware=middleware,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None
        if not openapi
        else OpenAPIConfig(
            title="convserve",
            version=__version__,
            description="Image classification for CNNs with batching, heatmaps and metrics.",
            path="/schema",
            render_plugins=render_plugins(),
            components=Components(
                security_schemes={"apiKey": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        logging_config=None,  # service.logs.configure_logging owns logging
        debug=False,
    )
    for key, value in provided.items():
        setattr(app.state, key, value)
    return app


def _constant(value: object) -> Callable[[], object]:
    return lambda: value
