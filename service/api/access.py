"""Access logs, request ids and per-request metrics, as one ASGI middleware."""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from litestar import Request
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.inference import Classified

log = logging.getLogger("convserve.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SCOPE_KEY = "convserve"
CLIENT_METHOD = "convserve.method"  # the method sent, where the app answers it as another (HEAD)
PREDICTION_PATHS = re.compile(r"^(/predict|/models/[^/]+/predict|/v2/models/.+/infer)$")


def annotate(request: Request[Any, Any, Any], **fields: object) -> None:
    """Attach facts (model, version, batch size) to the request for its access-log line."""
    facts = cast("dict[str, Any]", request.scope).setdefault(SCOPE_KEY, {})
    facts.update(fields)


def annotate_answer(request: Request[Any, Any, Any], classified: Classified) -> None:
    """The version that answered (a swap may have landed while the body was read) and the
    largest batch its images rode in."""
    route = classified.route
    batch_size = max(answer.batch_size for answer in classified.answers)
    annotate(request, model=route.name, version=route.version, batch_size=batch_size)


_PREFIX = uuid.uuid4().hex[:16]  # per process; a counter makes each id unique without a syscall
_COUNTER = itertools.count(1)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return f"{_PREFIX}{next(_COUNTER):016x}"


def access_middleware(app: ASGIApp, draining: Callable[[], bool] = lambda: False) -> ASGIApp:
    """Echo or mint X-Request-ID, log one line per request, count prediction outcomes.

    While the server drains, responses say `Connection: close`, so clients open a new
    connection (to another instance) instead of reusing this one as it goes away.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        raw = cast("dict[str, Any]", scope)
        if raw["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        facts: dict[str, Any] = {"request_id": request_id}
        raw[SCOPE_KEY] = facts
        predicting = bool(PREDICTION_PATHS.match(raw["path"])) and raw["method"] == "POST"
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if draining():
                    headers.append((b"connection", b"close"))
                message = cast("Message", {**message, "headers": headers})
            await send(message)

        if predicting:
            metrics.INFLIGHT.inc()
        try:
            await app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            if predicting:
                metrics.INFLIGHT.dec()
                model = str(facts.get("model", metrics.UNKNOWN))
                version = str(facts.get("version", metrics.UNKNOWN))
                metrics.REQUESTS.labels(model, version, str(status)).inc()
                metrics.REQUEST_DURATION.labels(model, str(status)).observe(elapsed)
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
