"""Decoding in child processes, against a real server: a ceiling, deadlines, hang-ups and turns.

The slow image is a legal 36-megapixel PNG of a smooth gradient: about 440 KB on the wire and
half a second of decoding, so a few of them keep every decoder busy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.data.make_corpus import multipart
from tests.support import (
    ServerProcess,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

PNG = {"content-type": "image/png"}
BOUNDARY = "convserve-decoding"
FORM = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


@functools.cache
def slow_png(side: int = 6000) -> bytes:
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grey = (np.add.outer(ramp, ramp) / 2).astype(np.uint8)
    return png_bytes(Image.fromarray(np.dstack([grey, grey.T, 255 - grey])), compress_level=9)


def many(data: bytes, count: int) -> bytes:
    return multipart([("file", f"{i}.png", data) for i in range(count)], BOUNDARY)


def restarts(server: ServerProcess, reason: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "convserve_decoder_restarts_total", reason=reason)


def wait_for_restart(server: ServerProcess, reason: str, before: float) -> None:
    """The decoder doing the stopped work is killed within a poll or two (50 ms each)."""
    deadline = time.monotonic() + 5
    while restarts(server, reason) <= before:
        assert time.monotonic() < deadline, f"no decoder was stopped ({reason})"
        time.sleep(0.05)


def assert_serves(server: ServerProcess, within_s: float) -> None:
    """A digit answered in time, decoded by a decoder process in every layout: as a 16-bit PNG,
    which a front worker never decodes itself (service.small_images)."""
    digit = held_out_digits(1)[0]
    sixteen = Image.fromarray(np.asarray(digit.image).astype(np.uint16) * 257)
    started = time.monotonic()
    response = httpx.post(f"{server.url}/predict", content=png_bytes(sixteen), headers=PNG)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["class_index"] == digit.label
    assert time.monotonic() - started < within_s


def decoder_pids(server: ServerProcess) -> set[int]:
    """The server's live decoder processes, wherever in its process tree they run."""
    found: set[int] = set()
    parents = [server.process.pid]
    while parents:
        pid = parents.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                parents.extend(int(child) for child in children.read_text().split())
        with contextlib.suppress(OSError):
            if b"service.decoder" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return {p for p in found if "State:\tZ" not in _status(p)}


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "State:\tZ"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # one front worker: its two decoders are the ones the requests take turns on
    env = {"CONVSERVE_DEADLINE_MS": "2000", "CONVSERVE_DECODE_THREADS": "2",
           "CONVSERVE_WORKERS": "1"}  # fmt: skip
    with running_server(tmp_path_factory.mktemp("decoding"), env) as process:
        yield process


def test_decoders_are_child_processes_without_torch(server: ServerProcess) -> None:
    pids = decoder_pids(server)
    assert len(pids) == 2
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps
        assert "PIL" in maps or "_imaging" in maps


def test_a_decode_past_the_deadline_is_stopped(server: ServerProcess) -> None:
    before = restarts(server, "deadline")
    body = many(slow_png(), 24)
    started = time.monotonic()
    response = httpx.post(f"{server.url}/predict", content=body, headers=FORM)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert "past its deadline" in response.json()["detail"]
    assert elapsed < 3.0  # the 2 s deadline, not the 4-8 s the decodes would take
    wait_for_restart(server, "deadline", before)
    assert_serves(server, within_s=3.0)


def test_a_client_that_hangs_up_cancels_its_decodes(server: ServerProcess) -> None:
    body = many(slow_png(), 24)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: hangs-up\r\n\r\n"
    ).encode()
    before = restarts(server, "cancelled")
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.4)  # the decoders are busy with it now
    wait_for_restart(server, "cancelled", before)
    assert_serves(server, within_s=2.0)
    deadline = time.monotonic() + 5
    while "request_id=hangs-up" not in server.output():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    line = next(x for x in server.output().splitlines() if "request_id=hangs-up" in x)
    assert " 499 " in line


def test_a_request_of_many_slow_images_does_not_starve_a_small_one(
    server: ServerProcess,
) -> None:
    big: dict[str, httpx.Response] = {}
    body = many(slow_png(), 24)

    def send_big() -> None:
        big["r"] = httpx.post(f"{server.url}/predict", content=body, headers=FORM, timeout=30)

    sender = threading.Thread(target=send_big)
    sender.start()
    time.sleep(0.6)  # both decoders are on the big request's images
    assert_serves(server, within_s=1.5)
    sender.join()
    assert big["r"].status_code == 504  # its own deadline still holds


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_past_the_memory_ceiling_fails_alone(tmp_path: Path, workers: str) -> None:
    env = {"CONVSERVE_DECODE_MEMORY_MB": "64", "CONVSERVE_DECODE_THREADS": "1",
           "CONVSERVE_WORKERS": workers}  # fmt: skip
    with running_server(tmp_path, env) as small:
        pid = small.process.pid
        before = restarts(small, "memory")
        response = httpx.post(f"{small.url}/predict", content=slow_png(), headers=PNG)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "64 MB decode ceiling" in response.json()["detail"]
        wait_for_restart(small, "memory", before)
        for _ in range(4):  # every worker (and its new decoder) still answers
            assert_serves(small, within_s=5.0)
        assert small.process.poll() is None
        assert small.process.pid == pid
        assert Path(f"/proc/{pid}").exists()


def test_a_decoder_killed_from_outside_is_replaced(tmp_path: Path) -> None:
    env = {"CONVSERVE_DECODE_THREADS": "1", "CONVSERVE_WORKERS": "1"}
    with running_server(tmp_path, env) as one:
        (decoder,) = decoder_pids(one)
        os.kill(decoder, 9)
        assert_serves(one, within_s=10.0)
        assert decoder_pids(one) - {decoder}
