"""Behaviour only a real uvicorn process shows: limits enforced before the body is read."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.support import exchange, held_out_digits, png_bytes, running_server


def test_declared_oversize_body_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    with running_server(tmp_path, {"CONVSERVE_MAX_BODY_BYTES": "100000"}) as server:
        head = (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        started = time.monotonic()
        answer = exchange(server.url, head + b"\x89PNG", timeout=5)  # 4 of the announced 10^9 bytes
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"application/problem+json" in answer
        assert time.monotonic() - started < 3
        ok = httpx.post(
            f"{server.url}/predict",
            content=png_bytes(held_out_digits(1)[0].image),
            headers={"content-type": "image/png"},
        )
        assert ok.status_code == 200


def test_chunked_oversize_body_is_cut_off(tmp_path: Path) -> None:
    with running_server(tmp_path, {"CONVSERVE_MAX_BODY_BYTES": "100000"}) as server:

        def chunks() -> object:
            for _ in range(50):
                yield b"\0" * 10_000

        response = httpx.post(
            f"{server.url}/predict",
            content=chunks(),  # type: ignore[arg-type]
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
