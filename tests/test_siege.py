"""The promise, end to end: no single client, however crafted its requests, can make the service
stop answering others.

One real uvicorn process takes the whole hostile corpus at once, three times over
(tests/data/corpus: bombs, containers, header floods, V2 amplification, malformed numbers, ...),
forty slow-but-legal images in one request (answered once, hung up on once), idle connections
and connections that send a byte a second, while normal clients keep classifying digits and a
probe in its own process asks /health/live every 50 ms. The measured numbers land in
artifacts/siege.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.corpus import MANIFEST, Reply, case_bytes, raw_request, send
from tests.data.make_corpus import multipart
from tests.support import (
    ARTIFACTS,
    ROOT,
    Digit,
    ServerProcess,
    child_pids,
    held_out_digits,
    png_bytes,
    running_server,
    tree_rss,
)

DEADLINE_S = 5.0
HEADER_TIMEOUT_S = 2.0
ENV = {
    "CONVSERVE_DEADLINE_MS": str(int(DEADLINE_S * 1000)),
    "CONVSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
}
SLACK_S = 2.0  # scheduling on two shared cores; an answer later than deadline + this is a hang
LIVENESS_EVERY_S = 0.05
LIVE_S = 0.1  # a liveness answer, at least LIVE_SHARE of them
LIVE_SHARE = 0.97
# every liveness answer: a quarter of a kubelet's default probe timeout (1 s). On two cores
# shared with the attackers, 1 poll in 100-300 landed at 105-180 ms when a wave did
LIMIT_S = 0.25
RSS_BOUND = 1536 * 1024 * 1024  # the server's process tree, over its resident size at rest
NORMAL_CLIENTS = 3
# between one answer and the next request: users, not a load test. With no pause, once digits
# no longer needed a decoder, three clients sent 500 requests/s at the server's raised
# priority and starved the decoders the hostile set waits for (a 400 became a 504)
NORMAL_PAUSE_S = 0.02
WAVES = 3  # the whole hostile set at once, three times over
HEAVY_PARTS = 40
IDLE_CONNECTIONS = 8
HOLD_S = 15.0  # how long an idle or trickling client waits for the server to close on it
SLOW_CONNECTIONS = 2  # of each kind: trickled heads, trickled bodies
PNG = {"content-type": "image/png"}

pytestmark = pytest.mark.slow


@dataclass
class Sampler:
    """Runs `step` in a thread every `every` seconds until stopped; keeps what it returns."""

    step: Callable[[], int]
    every: float
    results: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        ticks = 0
        while not self.stop.is_set():
            self.results.append(self.step())
            ticks += 1
            self.stop.wait(max(0.0, start + ticks * self.every - time.monotonic()))

    def finish(self) -> list[int]:
        self.stop.set()
        self.thread.join(timeout=30)
        return self.results


def classify(client: httpx.Client, digit: Digit) -> tuple[int, int | None, float]:
    """(status, top class, seconds) for one normal request."""
    started = time.monotonic()
    try:
        response = client.post("/predict", content=png_bytes(digit.image), headers=PNG)
    except httpx.HTTPError:  # no answer at all: a failure the assertions report
        return 0, None, time.monotonic() - started
    elapsed = time.monotonic() - started
    if response.status_code != 200:
        return response.status_code, None, elapsed
    top = response.json()["results"][0]["predictions"][0]["class_index"]
    return 200, int(top), elapsed


def normal_client(url: str, digits: list[Digit], stop: threading.Event, out: list[Any]) -> None:
    with httpx.Client(base_url=url, timeout=DEADLINE_S + 30) as client:
        index = 0
        while not stop.is_set():
            digit = digits[index % len(digits)]
            status, top, elapsed = classify(client, digit)
            out.append((digit.label, status, top, elapsed))
            index += 1
            stop.wait(NORMAL_PAUSE_S)


def hold_open(url: str, head: bytes, trickle: bytes, out: list[tuple[str, float]]) -> None:
    """Connect, send `head`, then `trickle` one byte a second (an idle connection sends
    neither) until the server closes the connection; records (the status that came back or
    "closed", seconds the connection stayed open)."""
    parts = urlsplit(url)
    started = time.monotonic()
    received, closed = b"", False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0) as sock:
            sock.sendall(head)
            for second in range(int(HOLD_S)):
                sock.sendall(trickle[second : second + 1])
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    closed = True
                    break
                received += chunk
                if b"\r\n\r\n" in received:
                    break  # answered: what matters is when
    except OSError:  # reset, a broken pipe, or refused
        closed = True
    elapsed = time.monotonic() - started
    if received.startswith(b"HTTP/"):
        out.append((received.split(b" ", 2)[1].decode(), elapsed))
    else:
        out.append(("closed" if closed else "open", elapsed))


def ahead_of_the_attackers(server: ServerProcess, probe_pid: int) -> None:
    """The attackers and the normal clients run in this process, on the server's two cores; in
    a deployment they are other machines, and the health checker is the node's own. So the
    server's event loop (its main thread) and the probe go ahead of this process's threads.
    Needs root (as CI runs); otherwise everyone shares the cores equally."""
    serving = child_pids(server, "service.front") | child_pids(server, "service.modelhost")
    for pid in (server.process.pid, *serving, probe_pid):
        with contextlib.suppress(PermissionError, ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, pid, -10)


def start_probe(url: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.liveness_probe", url, str(LIVENESS_EVERY_S)]
    return subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip


def stop_probe(probe: subprocess.Popen[str]) -> list[tuple[float, float, int]]:
    """(started, seconds, status) of every poll the probe made."""
    output, _ = probe.communicate(timeout=30)  # closing its stdin is its signal to stop
    polls = [line.split() for line in output.splitlines()]
    return [(float(started), float(seconds), int(status)) for started, seconds, status in polls]


def siege(url: str) -> dict[str, Reply]:
    """The whole hostile set at once, each request on its own connection."""
    replies: dict[str, Reply] = {}
    gate = threading.Barrier(len(MANIFEST))

    def attack(case: dict[str, Any]) -> None:
        raw = raw_request(case)
        gate.wait()
        replies[case["name"]] = send(url, raw, timeout=DEADLINE_S + 30)

    attackers = [threading.Thread(target=attack, args=(case,)) for case in MANIFEST]
    for thread in attackers:
        thread.start()
    for thread in attackers:
        thread.join(timeout=DEADLINE_S + 60)
    return replies


def heavy_request() -> bytes:
    """Forty 16-bit 40 MP PNGs (legal, each about 0.5 s to decode) in one multipart request:
    issue 13 found they held the decode pool for 24 s, after their client had hung up, while a
    normal request waited 23 s behind them."""
    png = case_bytes(next(c for c in MANIFEST if c["name"] == "png-16bit-40mp"))
    body = multipart([("file", f"{i}.png", png) for i in range(HEAVY_PARTS)], "siege")
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary=siege\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_no_single_client_can_take_the_service_down(tmp_path: Path) -> None:
    with running_server(tmp_path, ENV) as server:
        pid = server.process.pid
        # at rest: the digits the server labels right are the normal traffic's expected answers
        with httpx.Client(base_url=server.url, timeout=30) as client:
            digits = [d for d in held_out_digits(12) if classify(client, d)[1] == d.label]
        assert len(digits) >= 8
        idle_rss = tree_rss(pid)
        workers = child_pids(server, "service.front")

        probe = start_probe(server.url)
        ahead_of_the_attackers(server, probe.pid)
        memory = Sampler(lambda: tree_rss(pid), LIVENESS_EVERY_S)
        stop = threading.Event()
        normal: list[tuple[int, int, int | None, float]] = []
        idle: list[tuple[str, float]] = []
        slow_heads: list[tuple[str, float]] = []
        slow_bodies: list[tuple[str, float]] = []
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        lingering = [
            *[(idle, b"", b"")] * IDLE_CONNECTIONS,
            *[(slow_heads, b"", head + b"X-Slow: " + b"a" * 60)] * SLOW_CONNECTIONS,
            *[(slow_bodies, head + b"Content-Length: 9999\r\n\r\n", b"x" * 60)] * SLOW_CONNECTIONS,
        ]
        threads = [
            threading.Thread(target=normal_client, args=(server.url, digits, stop, normal))
            for _ in range(NORMAL_CLIENTS)
        ]
        threads += [
            threading.Thread(target=hold_open, args=(server.url, first, trickle, out))
            for out, first, trickle in lingering
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # normal traffic and the probe under way before the siege

        # beside the waves: the heavy request, once waited for and once hung up on at 1 s
        heavy: list[Reply] = []
        raw = heavy_request()
        heavies = [
            threading.Thread(target=lambda t=t: heavy.append(send(server.url, raw, timeout=t)))
            for t in (DEADLINE_S + 30, 1.0)
        ]
        siege_started = time.monotonic()
        for thread in heavies:
            thread.start()
        waves = [siege(server.url) for _ in range(WAVES)]
        for thread in heavies:
            thread.join(timeout=DEADLINE_S + 60)
        siege_ended = time.monotonic()
        time.sleep(1.0)  # and normal traffic after it
        stop.set()
        for thread in threads:
            thread.join(timeout=HOLD_S + 10)
        polls = stop_probe(probe)
        samples = memory.finish()
        alive = server.process.poll() is None
        log = server.output()

    replies = [(name, reply) for wave in waves for name, reply in wave.items()]
    during = [p for p in polls if siege_started <= p[0] <= siege_ended]
    worst_live = max(seconds for _, seconds, _ in polls)
    # (seconds into the siege, seconds to answer) of each poll over the limit
    late = [(round(t - siege_started, 3), round(s, 3)) for t, s, _ in polls if s > LIVE_S]
    peak_rss = max(samples)
    worst_normal = max(n[3] for n in normal)
    summary = {
        "hostile_requests": len(replies),
        "siege_s": round(siege_ended - siege_started, 2),
        "outcomes": {name: sorted({str(w[name].outcome) for w in waves}) for name in waves[0]},
        "hostile_slowest_s": round(max(r.elapsed for _, r in replies), 3),
        "heavy": [(reply.outcome, round(reply.elapsed, 3)) for reply in heavy],
        "normal_requests": len(normal),
        "normal_worst_s": round(worst_normal, 3),
        "liveness_polls": len(polls),
        "liveness_polls_during_siege": len(during),
        "liveness_worst_s": round(worst_live, 3),
        "liveness_late": late,
        "idle_connections": idle,
        "slow_heads": slow_heads,
        "slow_bodies": slow_bodies,
        "idle_rss_mb": idle_rss // 2**20,
        "peak_rss_mb": peak_rss // 2**20,
        "rss_growth_mb": (peak_rss - idle_rss) // 2**20,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "siege.json").write_text(json.dumps(summary, indent=1) + "\n")

    # the processes are the ones that started: none restarted, none killed
    assert alive, log[-3000:]
    assert log.count("Started server process") == len(workers)
    assert all(f"Started server process [{worker}]" in log for worker in workers)
    assert "died" not in log
    # every hostile request: its documented answer (a 4xx, or 200 for legal inputs), a 503
    # refusal, or a closed socket for a head the server stopped reading; never a hang
    assert len(replies) == WAVES * len(MANIFEST)
    for name, reply in replies:
        case = next(c for c in MANIFEST if c["name"] == name)
        allowed: set[int | str] = {case["status"], 503}
        if case["status"] == 200:
            allowed.add(504)  # legal but heavy work may not fit its deadline under siege
        if case["status"] in {414, 431}:
            allowed.add("closed")  # answered before the rest was read: a reset may lose it
        assert reply.outcome in allowed, (name, reply.outcome, reply.body[:300])
        assert reply.elapsed < DEADLINE_S + SLACK_S, (name, reply.elapsed)
    answered = [reply for reply in heavy if not reply.timed_out]  # not the one hung up on
    assert len(answered) == 1
    assert re.search(r"POST /predict 499 ", log), "the hung-up request's work was not dropped"
    assert answered[0].outcome in {200, 503, 504}, summary
    assert answered[0].elapsed < DEADLINE_S + SLACK_S, summary
    # every normal request: its 200 and its label, within the deadline
    assert len(normal) >= 10 * NORMAL_CLIENTS, summary
    assert all(status == 200 for _, status, _, _ in normal), normal
    assert all(label == top for label, _, top, _ in normal), normal
    assert worst_normal < DEADLINE_S, summary
    # idle connections and trickled heads are closed at the head timeout, trickled bodies at
    # the request deadline: none holds its connection for ever
    for connections, count, limit in [(idle, IDLE_CONNECTIONS, HEADER_TIMEOUT_S),
                                      (slow_heads, SLOW_CONNECTIONS, HEADER_TIMEOUT_S),
                                      (slow_bodies, SLOW_CONNECTIONS, DEADLINE_S)]:  # fmt: skip
        assert len(connections) == count
        assert all(outcome in {"closed", "408"} for outcome, _ in connections), summary
        assert all(seconds < limit + SLACK_S for _, seconds in connections), summary
    # liveness never missed a beat: polled every 50 ms through the siege, each answered well
    # within a kubelet's timeout, nearly all within 100 ms
    assert len(during) >= (siege_ended - siege_started) / LIVENESS_EVERY_S / 2, summary
    assert all(status == 200 for _, _, status in polls), summary
    assert len(late) <= (1 - LIVE_SHARE) * len(polls), summary
    assert worst_live <= LIMIT_S, summary
    # resident memory of the whole process tree stayed within the bound
    assert peak_rss - idle_rss < RSS_BOUND, summary
