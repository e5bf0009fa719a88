"""A liveness probe in its own process, as a kubelet's is: no test thread can delay it.

    python -m tests.liveness_probe URL EVERY_S

Every EVERY_S seconds it opens a new connection, asks GET /health/live and prints one line,
"started elapsed status" (monotonic seconds; status 0 when no answer came), until its stdin
is closed. Standard library only, so it starts in a moment and holds no GIL of the test's.
"""

from __future__ import annotations

import select
import socket
import sys
import time
from urllib.parse import urlsplit

LIVE = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
TIMEOUT_S = 5.0


def poll(host: str, port: int) -> int:
    """The status of one GET /health/live on a new connection (0 for none)."""
    received = b""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
            sock.sendall(LIVE)
            while chunk := sock.recv(65536):
                received += chunk
    except OSError:
        pass
    parts = received.split(b" ", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def main(url: str, every: float) -> None:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    start = time.monotonic()
    ticks = 0
    while True:
        started = time.monotonic()
        status = poll(parts.hostname, parts.port)
        print(f"{started:.6f} {time.monotonic() - started:.6f} {status}", flush=True)
        ticks += 1
        wait = max(0.0, start + ticks * every - time.monotonic())
        if select.select([sys.stdin], [], [], wait)[0]:
            return  # stdin readable: closed by the test


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
