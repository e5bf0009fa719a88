"""Log lines: JSON or text, one per line, with whatever a client sent escaped in the text form."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, cast

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a request id a client may choose
# the request being handled, for what the request path records beyond the access line (captures)
CURRENT_REQUEST: ContextVar[str | None] = ContextVar("convserve_request_id", default=None)


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


LOGGERS = ("convserve", "uvicorn", "litestar")


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
        )
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


@contextlib.contextmanager
def logging_configured(log_format: str, level: str) -> Iterator[None]:
    """configure_logging for one command, then the loggers as they were: a command run inside
    another program (the docs tests call the CLI's main) leaves its logging alone."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    configure_logging(log_format, level)
    try:
        yield
    finally:
        for logger, (handlers, number, propagate) in zip(loggers, saved, strict=True):
            logger.handlers[:] = handlers
            logger.setLevel(number)
            logger.propagate = propagate
