"""HTTP limits before the app: header count and bytes, request line, head timeout, connection
cap, against a real uvicorn process over raw sockets; and logs that requests cannot forge."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.logs import JsonFormatter, TextFormatter
from tests.support import ServerProcess, exchange, running_server, tree_rss

TIMEOUT_S = 1.0
CAP = 16
FAST = {"CONVSERVE_MODELS": "digits", "CONVSERVE_WARMUP": "0"}
LIMITED = {
    **FAST,
    "CONVSERVE_WORKERS": "1",  # the connection cap is per worker: one worker holds them all
    "CONVSERVE_HEADER_TIMEOUT_S": str(TIMEOUT_S),
    "CONVSERVE_MAX_CONNECTIONS": str(CAP),
}  # header count, header bytes and request line keep their defaults: 100, 64 KiB, 8 KiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("limits"), LIMITED) as running:
        yield running


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset counts as the close."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def assert_refused(answer: bytes, status: int, detail: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/problem+json" in head
    assert b"connection: close" in head
    problem = json.loads(body)
    assert problem["status"] == status
    assert detail in problem["detail"], problem
    assert "Traceback" not in problem["detail"]


def assert_serves(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/health/live", timeout=5)
    assert response.status_code == 200


def test_heads_at_the_limits_are_served(server: ServerProcess) -> None:
    headers = {f"x-field-{i}": "v" for i in range(95)}  # and httpx adds 5: 100 in all
    response = httpx.get(f"{server.url}/health/live", headers=headers)
    assert response.status_code == 200
    big = {"x-big": "a" * 60_000}
    assert httpx.get(f"{server.url}/health/live", headers=big).status_code == 200
    long_target = f"{server.url}/health/live?pad={'a' * 8000}"
    assert httpx.get(long_target).status_code == 200


def test_a_one_megabyte_header_gets_431(server: ServerProcess) -> None:
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    answer = exchange(server.url, head)
    assert_refused(answer, 431, "65536 bytes")
    assert_serves(server)


def test_ten_thousand_headers_get_431(server: ServerProcess) -> None:
    fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(10_000))
    answer = exchange(server.url, b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert_refused(answer, 431, "more than 100 header fields")
    assert_serves(server)


def test_a_long_request_line_gets_414(server: ServerProcess) -> None:
    answer = exchange(server.url, b"GET /health/live?" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
    assert_refused(answer, 414, "over 8192 bytes")
    assert_serves(server)


def test_endless_heads_are_cut_off_and_memory_stays_flat(server: ServerProcess) -> None:
    starts = [
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ",  # one header line, never ending
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Endless",  # a header name, never ending
        b"GET /health/live?",  # a request target, never ending
        # a chunked body's trailers, never ending
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\nX-Endless: ",
    ]
    limit = 256 * 1024 * 1024
    sent = [0] * len(starts)
    cut = [False] * len(starts)

    def stream(index: int) -> None:
        with connect(server.url) as sock:
            sock.sendall(starts[index])
            block = b"a" * 65536
            try:
                while sent[index] < limit:
                    sock.sendall(block)
                    sent[index] += len(block)
            except OSError:  # reset or broken pipe: the server cut us off
                cut[index] = True

    before = tree_rss(server.process.pid)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(starts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert cut == [True] * len(starts), sent
    assert max(sent) < 32 * 1024 * 1024, sent  # refused at 73 KiB, then a bounded linger
    grown = tree_rss(server.process.pid) - before
    assert grown < 40 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
    assert_serves(server)


def test_idle_and_slow_heads_are_closed_after_the_header_timeout(server: ServerProcess) -> None:
    openings = [
        b"",  # connects, says nothing
        b"GET /hea",  # half a request line
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a",  # half a head
    ]
    socks = [connect(server.url) for _ in openings]
    started = time.monotonic()
    for sock, opening in zip(socks, openings, strict=True):
        sock.sendall(opening)
    # slowloris: a byte of a header every 0.2 s, so no read is ever idle for long
    dripping = connect(server.url)
    dripping.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Drip: ")
    dripped_until_closed = False
    while time.monotonic() - started < 5 * TIMEOUT_S:
        try:
            dripping.sendall(b"a")
        except OSError:
            dripped_until_closed = True
            break
        dripping.settimeout(0.2)
        try:
            if dripping.recv(65536).startswith(b"HTTP/1.1 408"):
                dripped_until_closed = True
                break
        except TimeoutError:
            continue
    assert dripped_until_closed
    for sock in socks:
        with sock:
            assert_refused(read_to_close(sock), 408, "no complete request head within 1 s")
    elapsed = time.monotonic() - started
    assert 0.8 * TIMEOUT_S < elapsed < 3 * TIMEOUT_S
    dripping.close()
    assert_serves(server)


def keep_sending(sock: socket.socket, data: bytes, seconds: float) -> bytes:
    """Send `data` again and again (a 0.2 s receive timeout apart) for at most `seconds`,
    collecting what comes back until the server closes the connection."""
    received = b""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            sock.sendall(data)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return received


def test_an_answered_request_cannot_hold_its_connection_with_a_slow_body(
    server: ServerProcess,
) -> None:
    with connect(server.url) as sock:
        # a route that reads no body answers at once; the client then drips the body it announced
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\na")
        sock.settimeout(0.2)
        answered = time.monotonic()
        received = keep_sending(sock, b"a", 5 * TIMEOUT_S)
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert received.count(b"HTTP/1.1") == 1  # no second answer for the same request
        assert time.monotonic() - answered < 3 * TIMEOUT_S


def test_blank_lines_after_an_answer_do_not_keep_a_connection(server: ServerProcess) -> None:
    with connect(server.url) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(0.2)
        received = sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # each blank line used to cancel the keep-alive wait for good
        received += keep_sending(sock, b"\r\n", 5 * TIMEOUT_S)
        assert time.monotonic() - started < 3 * TIMEOUT_S
        assert b"HTTP/1.1 408" in received


def test_connections_past_the_cap_get_503_then_service_resumes(server: ServerProcess) -> None:
    extra = 6
    socks = [connect(server.url) for _ in range(CAP + extra)]
    for sock in socks[::2]:
        sock.sendall(b"GET /heal")  # half of them send half a request line, half nothing
    answers = []
    for sock in socks:
        with sock:
            answers.append(read_to_close(sock))
    refused = [a for a in answers if not a.startswith(b"HTTP/1.1 408")]
    # connections a previous test left lingering may count too, so at least `extra` refused
    assert len(refused) >= extra
    assert len(answers) - len(refused) <= CAP
    for answer in refused:  # a 503, or a reset when the half request line crossed the close
        if answer:
            assert_refused(answer, 503, f"maximum of {CAP} open connections")
            assert b"retry-after: 1" in answer
    assert any(refused), "no refused connection saw its 503"
    # the idle ones are gone after the header timeout: a normal request is served
    assert_serves(server)


def test_control_characters_in_a_path_cannot_forge_a_log_line(server: ServerProcess) -> None:
    # a model name that, decoded, ends the line and starts a fake one (no `/`: it must route)
    forged = "12:00:00 INFO convserve.access POST predict 200 0.1ms request_id=forged"
    encoded = forged.replace(" ", "%20")
    path = f"/models/x%0a{encoded}%0d%1b[2J%e2%80%a8"
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: forge-1\r\nConnection: close\r\n\r\n"
    answer = exchange(server.url, head.encode())
    assert answer.startswith(b"HTTP/1.1 404")
    deadline = time.monotonic() + 5
    while "request_id=forge-1" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.output().splitlines()
    [line] = [line for line in lines if "request_id=forge-1" in line]
    assert "/models/x\\x0a12:00:00\\x20INFO" in line
    assert "\\x0d\\x1b[2J\\u2028" in line
    assert not any(other.startswith("12:00:00") or "\x1b" in other for other in lines)


def test_both_log_formats_escape_what_a_client_sent() -> None:
    path = "/x\n12:00:00 INFO forged\r\x1b[2J\u2028\\x0a"
    access = {"request_id": "r1", "method": "GET", "path": path, "status": 404, "latency_ms": 1.0}
    record = logging.LogRecord("convserve.access", logging.INFO, __file__, 1, "access", None, None)
    record.access = access
    text = TextFormatter().format(record)
    assert not set(text) & {"\n", "\r", "\x1b", "\u2028"}
    assert "/x\\x0a12:00:00\\x20INFO\\x20forged\\x0d\\x1b[2J\\u2028\\\\x0a" in text
    entry = json.loads(JsonFormatter().format(record))
    assert entry["path"] == path  # json.dumps escapes it; the reader gets it back exactly
    assert "\n" not in JsonFormatter().format(record)
    message = logging.LogRecord(
        "convserve", logging.ERROR, __file__, 1, "error on %s %s", ("GET", path), None
    )
    line = TextFormatter("%(message)s").format(message)
    assert line == "error on GET /x\\x0a12:00:00 INFO forged\\x0d\\x1b[2J\\u2028\\\\x0a"


@pytest.mark.slow  # starting two worker processes takes most of half a minute
def test_the_limits_hold_in_every_worker_process(tmp_path: Path) -> None:
    env = {**LIMITED, "CONVSERVE_WORKERS": "2", "CONVSERVE_MAX_HEADER_COUNT": "10"}
    with running_server(tmp_path, env) as server:
        fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(20))
        for _ in range(8):  # new connections land on either worker
            answer = exchange(server.url, b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
            assert_refused(answer, 431, "more than 10 header fields")
        with connect(server.url) as sock:
            started = time.monotonic()
            assert_refused(read_to_close(sock), 408, "within 1 s")
            assert time.monotonic() - started < 3 * TIMEOUT_S


def test_the_connection_cap_fits_the_open_file_limit() -> None:
    script = (
        "import resource\n"
        "from service.config import Settings\n"
        "from service.protocols import HttpLimits\n"
        "from service.server import file_limited\n"
        "limits = HttpLimits.from_settings(Settings())\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 2000))\n"
        "print(file_limited(limits).max_connections)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))\n"
        "print(file_limited(limits).max_connections)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    # a soft limit of 300 is raised to fit 1024 connections and 256 spare descriptors; under a
    # hard limit of 400 the cap comes down to the 144 that fit, with a warning
    assert done.stdout.split() == ["1024", str(1024 + 256), "144"]
    assert "capping at 144" in done.stderr
