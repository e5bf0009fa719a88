"""The hostile corpus as tests use it: its manifest, and each case sent as raw HTTP bytes."""

from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.data.make_corpus import HERE as CORPUS

MANIFEST: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
UPLOADS = [case for case in MANIFEST if case["kind"] == "upload"]
REQUESTS = [case for case in MANIFEST if case["kind"] == "http"]


def case_bytes(case: dict[str, Any]) -> bytes:
    return (CORPUS / str(case["file"])).read_bytes()


def raw_request(case: dict[str, Any]) -> bytes:
    """The whole HTTP/1.1 request for a case: uploads are POSTed to /predict."""
    data = case_bytes(case)
    if case["kind"] == "http":
        return data
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {case['content_type']}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode("latin-1") + data


@dataclass
class Reply:
    """What came back on one connection. `status` is None when the server closed (or reset) the
    connection without an answer, or when nothing came before the timeout (`timed_out`)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0
    timed_out: bool = False

    @property
    def outcome(self) -> int | str:
        """The status, or "closed" / "hung" when there is none."""
        if self.status is not None:
            return self.status
        return "hung" if self.timed_out else "closed"

    def problem(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def parse_reply(received: bytes, elapsed: float, timed_out: bool) -> Reply:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdecimal():
        return Reply(None, elapsed=elapsed, timed_out=timed_out and not received)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Reply(int(parts[1]), headers, body, elapsed, timed_out)


def send(url: str, raw: bytes, timeout: float) -> Reply:
    """Send `raw` on a new connection, reading whatever comes back meanwhile (a server may answer
    before it has read everything, then close), until the server closes it or `timeout`."""
    parts = urlsplit(url)
    started = time.monotonic()
    deadline = started + timeout
    received = b""
    try:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    except TimeoutError:
        return Reply(None, elapsed=time.monotonic() - started, timed_out=True)
    except OSError:  # refused or reset while connecting
        return Reply(None, elapsed=time.monotonic() - started)
    with sock:
        sock.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            pending = memoryview(raw)
            while (left := deadline - time.monotonic()) > 0:
                events = selector.select(left)
                if not events:
                    continue
                _, mask = events[0]
                try:
                    if mask & selectors.EVENT_READ:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        received += chunk
                    if mask & selectors.EVENT_WRITE and pending:
                        pending = pending[sock.send(pending[:65536]) :]
                        if not pending:
                            selector.modify(sock, selectors.EVENT_READ)
                except OSError:  # reset, or a broken pipe
                    break
            else:
                return parse_reply(received, time.monotonic() - started, timed_out=True)
    return parse_reply(received, time.monotonic() - started, timed_out=False)
