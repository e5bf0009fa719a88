"""Access logs, request ids and per-request metrics, as one ASGI middleware."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from litestar import Request
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

log = logging.getLogger("convserve.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SCOPE_KEY = "convserve"
PREDICTION_PATHS = re.compile(r"^(/predict|/models/[^/]+/predict|/v2/models/.+/infer)$")


def annotate(request: Request[Any, Any, Any], **fields: object) -> None:
    """Attach facts (model, version, batch size) to the request for its access-log line."""
    facts = cast("dict[str, Any]", request.scope).setdefault(SCOPE_KEY, {})
    facts.update(fields)


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
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "latency_ms": round(elapsed * 1000, 2),
        **{k: v for k, v in facts.items() if k != "request_id"},
    }
    client = scope.get("client")
    if client:
        record["client"] = client[0]
    log.info("access", extra={"access": record})


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


SUSPECT = re.compile(r"[^!-~]")  # all but visible ASCII; each is checked by _escape_char


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char.isprintable() and not char.isspace():
        return char  # visible non-ASCII text, such as a name in Greek
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape(value: object) -> str:
    """A log field that cannot end the line, pose as another field or hide text.

    Control, format and space characters become `\\xNN`/`\\uNNNN` (a `%0a` in a path logs as
    `\\x0a`); a backslash is doubled, so an escape in the log always means an escaped character.
    """
    return SUSPECT.sub(_escape_char, str(value).replace("\\", "\\\\"))


def escape_text(value: str) -> str:
    """Like escape(), but plain spaces stay: for the arguments of a log message."""
    return " ".join(escape(part) for part in value.split(" "))


class TextFormatter(logging.Formatter):
    """One line per record; client-controlled text (paths, ids, message arguments) escaped."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if access is None:
            if isinstance(record.args, tuple) and record.args:
                # a copy: other handlers (and the exception text) see the record unchanged
                record = logging.makeLogRecord(record.__dict__)
                record.args = tuple(
                    escape_text(arg) if isinstance(arg, str) else arg
                    for arg in cast("tuple[object, ...]", record.args)
                )
            return super().format(record)
        extras = " ".join(
            f"{k}={escape(v)}"
            for k, v in access.items()
            if k not in {"method", "path", "status", "latency_ms"}
        )
        request = f"{escape(access['method'])} {escape(access['path'])} {access['status']}"
        line = f"{request} {access['latency_ms']}ms {extras}"
        return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} {record.name} {line}"


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
        )
    for name in ("convserve", "uvicorn", "litestar"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
