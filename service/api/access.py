"""Access logs, request ids and per-request metrics, as one ASGI middleware."""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs

from litestar import Request
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, tracing
from service.errors import ServiceError
from service.inference import Classified, Route
from service.logs import CURRENT_REQUEST, REQUEST_ID

log = logging.getLogger("convserve.access")
SCOPE_KEY = "convserve"
CLIENT_METHOD = "convserve.method"  # the method sent, where the app answers it as another (HEAD)
PREDICTION_PATHS = re.compile(
    r"^(/predict|/models/(?P<name>[^/]+)/predict"
    r"|/v2/models/(?P<v2>[^/]+)(/versions/(?P<version>[^/]+))?/infer)$"
)
Resolve = Callable[[str | None, str | None], Awaitable[Route]]
"""Models.route: the version a model name and version (or alias) route to."""


def annotate(request: Request[Any, Any, Any], **fields: object) -> None:
    """Attach facts (model, version, batch size) to the request for its access-log line."""
    facts = cast("dict[str, Any]", request.scope).setdefault(SCOPE_KEY, {})
    facts.update(fields)


def annotate_answer(request: Request[Any, Any, Any], classified: Classified) -> None:
    """The version that answered (a swap may have landed while the body was read) and the
    largest batch its images rode in, or that the response cache answered (no batch)."""
    route = classified.route
    if classified.cached:
        annotate(request, model=route.name, version=route.version, cache="hit")
        return
    batch_size = max(answer.batch_size for answer in classified.answers)
    annotate(request, model=route.name, version=route.version, batch_size=batch_size)


_PREFIX = uuid.uuid4().hex[:16]  # per process; a counter makes each id unique without a syscall
_COUNTER = itertools.count(1)


def _traceparent(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"traceparent":
            return str(value.decode("latin-1"))
    return None


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return f"{_PREFIX}{next(_COUNTER):016x}"


async def name_refused(
    resolve: Resolve, scope: dict[str, Any], path: re.Match[str], facts: dict[str, Any]
) -> None:
    """The model (and version) of a prediction refused before its route annotated it (a bad
    query value, an unknown version), so its 4xx counts under the model's name. Only names the
    catalog knows become labels, never the raw value sent."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    name = path["name"] or path["v2"] or next(iter(query.get("model", [])), None)
    version = path["version"] or next(iter(query.get("version", [])), None)
    try:
        route = await resolve(name, version)
        facts.update(model=route.name, version=route.version)
        return
    except ServiceError:
        if version is None:
            return
    with contextlib.suppress(ServiceError):  # a known model, asked for a version it lacks
        route = await resolve(name, None)
        facts.update(model=route.name, version=metrics.UNKNOWN)


def access_middleware(
    app: ASGIApp, draining: Callable[[], bool] = lambda: False, resolve: Resolve | None = None
) -> ASGIApp:
    """Echo or mint X-Request-ID, log one line per request, count prediction outcomes.

    While the server drains, responses say `Connection: close`, so clients open a new
    connection (to another instance) instead of reusing this one as it goes away. `resolve`
    names the model of a prediction refused with a 4xx before its route did.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        raw = cast("dict[str, Any]", scope)
        if raw["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        CURRENT_REQUEST.set(request_id)
        facts: dict[str, Any] = {"request_id": request_id}
        raw[SCOPE_KEY] = facts
        path = PREDICTION_PATHS.match(raw["path"])
        predicting = path is not None and raw["method"] == "POST"
        status = 500
        answered: float | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = time.perf_counter()
            elif message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if draining():
                    headers.append((b"connection", b"close"))
                message = cast("Message", {**message, "headers": headers})
            await send(message)

        if predicting:
            metrics.INFLIGHT.inc()
        method, target = raw["method"], raw["path"]
        attributes = {"http.request.method": method, "url.path": target,
                      "convserve.request_id": request_id}  # fmt: skip
        with tracing.request_span(f"{method} {target}", _traceparent(raw), attributes) as span:
            if span is not None:
                facts["trace_id"] = tracing.trace_id()
            try:
                await app(scope, receive, send_with_id)
                if predicting and 400 <= status < 500 and "model" not in facts and resolve:
                    assert path is not None
                    await name_refused(resolve, raw, path, facts)
            finally:
                elapsed = (answered or time.perf_counter()) - started
                if predicting:
                    metrics.INFLIGHT.dec()
                    model = str(facts.get("model", metrics.UNKNOWN))
                    version = str(facts.get("version", metrics.UNKNOWN))
                    metrics.REQUESTS.labels(model, version, str(status)).inc()
                    metrics.REQUEST_DURATION.labels(model, str(status)).observe(elapsed)
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                    for key in ("model", "version", "batch_size", "cache"):
                        if key in facts:
                            span.set_attribute(f"convserve.{key}", facts[key])
                _log(raw, facts, status, elapsed)

    return middleware


def _log(scope: dict[str, Any], facts: dict[str, Any], status: int, elapsed: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    record = {
        "request_id": facts["request_id"],
        "method": scope.get(CLIENT_METHOD, scope["method"]),
        "path": scope["path"],
        "status": status,
        "latency_ms": round(elapsed * 1000, 2),
        **{k: v for k, v in facts.items() if k != "request_id"},
    }
    client = scope.get("client")
    if client:
        record["client"] = client[0]
    log.info("access", extra={"access": record})
