"""uvicorn's HTTP protocol with our connection limits: bounded request heads, a head timeout, a
cap on open connections, and problem+json for every request refused before it reaches the app."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.errors import (
    HeadersTooLargeError,
    MalformedRequestError,
    RequestTimeoutError,
    ServiceError,
    TooManyConnectionsError,
    UriTooLongError,
)
from service.problems import problem_json

log = logging.getLogger("convserve.http")
LINGER_S = 2.0  # after a refusal, read and drop what the client still sends, so it sees the answer
LINGER_BYTES = 4 * 1024 * 1024  # ...for this long and at most this much
NOTICE_EVERY_S = 10.0  # refusals cost an attacker little: log them at most this often, as counts


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may hold before the app sees a request (CONVSERVE_* settings)."""

    max_header_count: int
    max_header_bytes: int
    max_request_line_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_count=settings.max_header_count,
            max_header_bytes=settings.max_header_bytes,
            max_request_line_bytes=settings.max_request_line_bytes,
            header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections,
        )

    @property
    def raw_head_bytes(self) -> int:
        """Bytes a head may take on the wire: line, fields, and 1 KiB for line ends and spaces."""
        return self.max_request_line_bytes + self.max_header_bytes + 1024


class LimitedConfig(uvicorn.Config):
    """uvicorn's Config carrying our limits, so worker processes get them with the rest of it."""

    def __init__(self, app: Any, *, limits: HttpLimits, **options: Any) -> None:
        super().__init__(app, http=ProblemHttpProtocol, **options)
        self.limits = limits


def problem_bytes(
    error: ServiceError, default_headers: list[tuple[bytes, bytes]], *, close: bool = True
) -> bytes:
    """A whole problem+json response, written straight to the socket by the protocol."""
    body = problem_json(error.status_code, error.title, error.slug, error.detail)
    phrase = HTTPStatus(error.status_code).phrase
    status = f"HTTP/1.1 {error.status_code} {phrase}\r\n".encode("ascii")
    head = [status, *(name + b": " + value + b"\r\n" for name, value in default_headers)]
    if error.retry_after is not None:
        head.append(b"retry-after: " + str(max(1, round(error.retry_after))).encode() + b"\r\n")
    head += [
        b"content-type: application/problem+json\r\n",
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
        b"connection: close\r\n\r\n" if close else b"\r\n",
    ]
    return b"".join(head) + body


def malformed_response(message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    detail = f"malformed HTTP request ({message}); the connection is closed"
    return problem_bytes(MalformedRequestError(detail), default_headers)


class _Notices:
    """Counts refusals by kind and logs each kind at most every NOTICE_EVERY_S seconds."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.missed: dict[str, int] = {}

    def note(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -NOTICE_EVERY_S) < NOTICE_EVERY_S:
            self.missed[kind] = self.missed.get(kind, 0) + 1
            return
        self.last[kind] = now
        missed = self.missed.pop(kind, 0)
        log.warning("%s%s", message, f" (and {missed} more since the last one)" if missed else "")


_NOTICES = _Notices()  # per process, as the connections it counts


class _StopParsingError(Exception):
    """Raised inside a parser callback to stop httptools once the connection is answered."""


class ProblemHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded before the app sees a request.

    httptools buffers a header line until it ends, so sizes are counted as bytes arrive: the
    request target in on_url, each header in on_header, and the raw bytes of every read that
    ends inside a head (or the trailers of a chunked body) for a line that never ends. Module
    level, so worker processes can unpickle the uvicorn config that names it.
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if isinstance(config, LimitedConfig):
            self.limits = config.limits
        else:  # a plain uvicorn.Config: the default limits
            self.limits = HttpLimits.from_settings(Settings())
        self.head_timer: asyncio.TimerHandle | None = None  # for a head, or an answered body
        self.linger_timer: asyncio.TimerHandle | None = None
        self.refused = False
        self.dropped = 0  # bytes read and dropped after a refusal
        self.in_fields = True  # reading a head or trailers, not a body nor an answer
        self.in_trailers = False  # after the last chunk of a body
        self.field_reads = 0  # bytes of the reads that began and ended in_fields
        self.events = 0  # parser events that leave or enter in_fields
        self.header_count = 0
        self.header_bytes = 0

    # connection life
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport  # never counted: close at once, so the cap holds the fds
            self.refused = True
            _NOTICES.note(
                "connections", f"connection refused: {len(self.connections)} open is the cap"
            )
            error = TooManyConnectionsError(
                f"the server holds its maximum of {self.limits.max_connections} open "
                "connections; retry shortly",
                retry_after=1,
            )
            transport.write(problem_bytes(error, self.server_state.default_headers))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # lingering after a refusal: drop the rest, up to a point
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self.in_head:
            self._arm_head_timer()  # even for bytes that start no request, such as blank lines
        counted, events = self.in_fields, self.events
        super().data_received(data)  # feeds the parser; the callbacks below run inside
        if self.refused or not (counted and self.in_fields and self.events == events):
            return
        self.field_reads += len(data)
        budget = self.limits.raw_head_bytes
        if self.field_reads > budget:
            self._refuse(
                HeadersTooLargeError(
                    f"the request head went past {budget} bytes without ending; "
                    f"header fields may total {self.limits.max_header_bytes} bytes"
                )
            )

    def send_400_response(self, msg: str) -> None:
        if self.refused:
            return  # a callback refused the request and raised to stop the parser
        self.refused = True
        self._cancel_head_timer()
        self.transport.write(malformed_response(msg, self.server_state.default_headers))
        self.transport.close()

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_count = self.header_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        line = len(self.url) + len(self.parser.get_method()) + 1
        if line > self.limits.max_request_line_bytes:
            self._refuse(
                UriTooLongError(
                    f"the request line (method and target) is over "
                    f"{self.limits.max_request_line_bytes} bytes"
                )
            )
            raise _StopParsingError

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        if self.header_count > self.limits.max_header_count:
            self._refuse(
                HeadersTooLargeError(
                    f"more than {self.limits.max_header_count} header fields in one request"
                )
            )
            raise _StopParsingError
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse(
                HeadersTooLargeError(
                    f"the header fields total more than {self.limits.max_header_bytes} bytes"
                )
            )
            raise _StopParsingError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._leave_fields()
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        # the last chunk (size 0) is followed by trailers; any other chunk by on_body
        self.events += 1
        self.in_fields = self.in_trailers = True

    def on_body(self, body: bytes) -> None:
        self._leave_fields()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._leave_fields()
        self.in_fields = True  # the next request's head, whenever it comes
        if self.cycle is not None and self.cycle.response_complete:
            self._cancel_head_timer()  # the rest of an answered request has come
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.in_head and not self.transport.is_closing():
            # answered before its body or trailers came (a refusal, a route that reads no
            # body): the rest must come as soon as a head would, or the connection is closed
            self._arm_head_timer()

    # refusals
    def _leave_fields(self) -> None:
        self.events += 1
        self.in_fields = self.in_trailers = False
        self.field_reads = 0

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    @property
    def in_head(self) -> bool:
        """Between requests or inside a head: where an answer can be sent before the app's."""
        return self.in_fields and not self.in_trailers

    def _head_timed_out(self) -> None:
        self.head_timer = None
        seconds = f"{self.limits.header_timeout_s:g} s"
        if self.in_head:
            detail = f"no complete request head within {seconds}; the connection is closed"
        else:  # only logged: the request has its answer
            detail = f"the rest of an answered request did not come within {seconds}"
        self._refuse(RequestTimeoutError(detail), linger=False)

    def _refuse(self, error: ServiceError, *, linger: bool = True) -> None:
        """Answer `error` and close the connection, lingering so the client can read it."""
        if self.refused:
            return
        self.refused = True
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        _NOTICES.note(error.slug, f"{error.status_code} {error.title}: {error.detail}")
        if not self.in_head or (self.cycle is not None and not self.cycle.response_complete):
            # in a request's body or trailers, or while an earlier one is being answered: an
            # answer now would be taken for that request's
            self.transport.close()
            return
        self.transport.write(problem_bytes(error, self.server_state.default_headers))
        if linger and self.transport.can_write_eof():
            # closing with unread input makes the kernel send a reset, which can destroy the
            # answer before the client reads it; half-close and drop its input for a while
            self.transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
