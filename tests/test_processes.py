"""The process model, with two front workers as users run it: one model process behind them,
batches across workers, the whole contract through either worker, crashes that stay local."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.support import (
    BUNDLED_STORE,
    ServerProcess,
    child_pids,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

PNG = {"content-type": "image/png"}
KEY = {"authorization": "Bearer test-key"}
TWO = {"CONVSERVE_WORKERS": "2", "CONVSERVE_LOG_FORMAT": "json"}


def fresh(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a new connection: the kernel gives it to either worker."""
    return httpx.request(method, f"{server.url}{path}", timeout=30, **kwargs)


def access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [line for line in lines if "request_id" in line and "status" in line]


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_workers_hold_no_torch_and_one_model_process_serves_them(tmp_path: Path) -> None:
    with running_server(tmp_path, TWO) as server:
        fronts = child_pids(server, "service.front")
        models = child_pids(server, "service.modelhost")
        assert len(fronts) == 2
        assert len(models) == 1
        for pid in fronts:
            assert "libtorch" not in mapped_libraries(pid)
        # the model process imports torch unless its versions were prepared (test_prepared.py)
        body = png_bytes(held_out_digits(1)[0].image)
        for _ in range(6):
            assert fresh(server, "POST", "/predict", content=body, headers=PNG).status_code == 200


def test_a_batch_forms_from_the_requests_of_both_workers(tmp_path: Path) -> None:
    """Request ids carry their worker's prefix. A request whose batch was larger than the
    number of requests its own worker took in that round shared its batch with the other
    worker's. The kernel picks the worker for each connection, so rounds repeat until one
    spreads over both."""
    bodies = [png_bytes(d.image) for d in held_out_digits(6)]
    # the same six images each round: the response cache would answer them after the first
    env = {**TWO, "CONVSERVE_MAX_DELAY_MS": "300", "CONVSERVE_CACHE_ENTRIES": "0"}
    with running_server(tmp_path, env) as server, ThreadPoolExecutor(len(bodies)) as pool:
        for _ in range(60):
            before = len(access_lines(server))
            send = lambda b: fresh(server, "POST", "/predict", content=b, headers=PNG)  # noqa: E731
            responses = list(pool.map(send, bodies))
            assert all(r.status_code == 200 for r in responses)
            time.sleep(0.2)  # the access lines are written after the answers
            round_ = [e for e in access_lines(server)[before:] if e["path"] == "/predict"]
            taken = Counter(e["request_id"][:16] for e in round_)
            if any(e["batch_size"] > taken[e["request_id"][:16]] for e in round_):
                break
        else:
            raise AssertionError("no batch held requests of both workers in 60 rounds")


def test_management_and_store_watching_reach_every_worker(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(BUNDLED_STORE / "digits", store / "digits")
    env = {**TWO, "CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": "test-key",
           "CONVSERVE_WATCH": "1", "CONVSERVE_WATCH_INTERVAL_S": "0.2"}  # fmt: skip
    body = png_bytes(held_out_digits(1)[0].image)
    with running_server(tmp_path, env) as server:
        moved = fresh(
            server, "PUT", "/models/digits/aliases/prod", json={"version": 1}, headers=KEY
        )
        assert moved.status_code == 200, moved.text
        for _ in range(8):  # every worker sees the one catalog
            (listed,) = fresh(server, "GET", "/models").json()["models"]
            assert listed["aliases"] == {"prod": 1}
            answer = fresh(server, "POST", "/predict?version=prod", content=body, headers=PNG)
            assert answer.json()["model"]["version"] == 1
        # a new version loaded through the API serves through both workers
        shutil.copytree(store / "digits" / "1", tmp_path / "v2")
        (tmp_path / "v2").rename(store / "digits" / "2")
        deadline = time.monotonic() + 30
        while fresh(server, "GET", "/models").json()["models"][0]["serving_version"] != 2:
            assert time.monotonic() < deadline, "the watcher did not load v2"
            time.sleep(0.2)
        for _ in range(8):
            answer = fresh(server, "POST", "/predict", content=body, headers=PNG)
            assert answer.json()["model"]["version"] == 2
        one = {"version": 1}
        pinned = fresh(server, "PUT", "/models/digits/default", json=one, headers=KEY)
        assert pinned.status_code == 200, pinned.text
        for _ in range(8):
            answer = fresh(server, "POST", "/predict", content=body, headers=PNG)
            assert answer.json()["model"]["version"] == 1
        refused = fresh(server, "POST", "/models/digits/versions/1/unload")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"


def test_metrics_request_ids_and_heatmaps_through_either_worker(tmp_path: Path) -> None:
    digits = held_out_digits(12)
    with running_server(tmp_path, TWO) as server:
        for index, digit in enumerate(digits):
            answer = fresh(
                server, "POST", "/predict", content=png_bytes(digit.image),
                headers={**PNG, "x-request-id": f"mine-{index}"},
            )  # fmt: skip
            assert answer.status_code == 200
            assert answer.headers["x-request-id"] == f"mine-{index}"
        card = fresh(server, "GET", "/models/digits", headers={"x-request-id": "card-1"})
        assert card.headers["x-request-id"] == "card-1"
        picture = fresh(
            server, "POST", "/predict", content=png_bytes(digits[0].image),
            headers={**PNG, "accept": "image/png"},
        )  # fmt: skip
        assert picture.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(picture.content)) as heatmap:
            assert heatmap.format == "PNG"
            assert heatmap.width == heatmap.height >= 28
        scrapes = [fresh(server, "GET", "/metrics").text for _ in range(6)]
        page = fresh(server, "GET", "/")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        schema = fresh(server, "GET", "/schema/openapi.json").json()
        assert "/predict" in schema["paths"]
        assert "/models/{name}/versions/{version}/load" in schema["paths"]
    for text in scrapes:  # one view, whichever worker answered
        assert metric_value(text, "convserve_images_total", model="digits") == 13
        assert metric_value(text, "convserve_batch_size_sum", model="digits") == 13
        assert metric_value(text, "convserve_requests_total", model="digits", status="200") == 13
        assert metric_value(text, "convserve_ready") == 1
    logged = {e["request_id"]: e for e in access_lines(server)}
    for index in range(12):
        line = logged[f"mine-{index}"]
        assert (line["path"], line["status"], line["model"], line["batch_size"]) == (
            "/predict",
            200,
            "digits",
            1,
        )
    assert logged["card-1"]["path"] == "/models/digits"


def test_a_dead_model_process_means_503_not_a_hang_and_it_comes_back(tmp_path: Path) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    results: list[tuple[float, Any]] = []
    readiness: list[tuple[float, int]] = []
    stop = threading.Event()
    with running_server(tmp_path, TWO) as server:

        def client_loop() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    try:
                        result: Any = client.post("/predict", content=body, headers=PNG)
                    except httpx.HTTPError as exc:
                        result = exc
                    results.append((time.monotonic(), result))

        def watch() -> None:
            while not stop.is_set():
                # stamped when asked: an answer that left before the kill and landed after it
                # (slow under load) would say the replacement was ready before it was
                asked = time.monotonic()
                with httpx.Client(timeout=5) as client:
                    status = client.get(f"{server.url}/health/ready").status_code
                readiness.append((asked, status))
                time.sleep(0.02)

        threads = [threading.Thread(target=client_loop) for _ in range(6)]
        threads.append(threading.Thread(target=watch))
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        (victim,) = child_pids(server, "service.modelhost")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (child_pids(server, "service.modelhost") - {victim}) or not any(
            t > killed_at and s == 200 for t, s in readiness
        ):
            assert time.monotonic() < deadline, "the model process did not come back"
            time.sleep(0.1)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join()
        assert server.process.poll() is None
    answered = [r for _, r in results if isinstance(r, httpx.Response)]
    assert len(answered) == len(results), [r for _, r in results if r not in answered][:3]
    statuses = {r.status_code for r in answered}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses  # the loss was seen, and answered at once
    details = {r.json()["detail"] for r in answered if r.status_code == 503}
    # the lost process, then its replacement loading: each a 503 that says why
    expected = ("model process", "still loading")
    assert all(any(e in d for e in expected) for d in details), details
    after = [s for t, s in readiness if t > killed_at]
    assert 503 in after
    assert after[-1] == 200, readiness[-12:]
    back = [r for t, r in results if isinstance(r, httpx.Response) and t > killed_at + 1]
    assert back
    assert back[-1].status_code == 200
