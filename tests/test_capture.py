"""Capture (CONVSERVE_CAPTURE_DIR): real servers keep the images their rules pick, with the
original bytes and a sidecar each, bounded per minute and on disk, and never at a client's
expense: a disk that fails costs captures, not answers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import (
    BUNDLED_STORE,
    ServerProcess,
    held_out_digits,
    metric_value,
    png_bytes,
    run_cli,
    running_server,
)

PNG = {"content-type": "image/png"}


def noise(seed: int) -> bytes:
    """A picture of nothing."""
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def overlaid(count: int) -> list[bytes]:
    """Two different digits drawn over each other: the digits network is often unsure."""
    sample = held_out_digits(count + 13)
    return [
        png_bytes(Image.fromarray(np.maximum(np.asarray(a.image), np.asarray(b.image))))
        for a, b in zip(sample[:count], sample[13 : 13 + count], strict=True)
    ]


def digits(count: int) -> list[bytes]:
    return [png_bytes(d.image) for d in held_out_digits(count)]


def post(server: ServerProcess, body: bytes, request_id: str) -> httpx.Response:
    headers = {**PNG, "x-request-id": request_id}
    response = httpx.post(f"{server.url}/predict", content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def captured(folder: Path, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
    """The sidecars below `folder` once `count` are written (the writer is off the request)."""
    give_up = time.monotonic() + timeout
    while True:
        found = sorted(folder.glob("*/*.json"))
        if len(found) >= count or time.monotonic() > give_up:
            return [json.loads(path.read_text()) for path in found]
        time.sleep(0.1)


Serve = Callable[..., AbstractContextManager[ServerProcess]]


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    """`convserve serve` on the bundled digits, capturing into tmp_path/captured unless told."""

    def start(**env: str) -> AbstractContextManager[ServerProcess]:
        environ = {"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_MODELS": "digits",
                   "CONVSERVE_CAPTURE_DIR": str(tmp_path / "captured"), **env}  # fmt: skip
        return running_server(tmp_path, environ)

    return start


def test_uncertain_images_are_kept_with_what_the_model_said(serve: Serve, tmp_path: Path) -> None:
    """Two front workers; overlaid digits are often uncertain, clean ones seldom."""
    folder = tmp_path / "captured"
    with serve(CONVSERVE_WORKERS="2", CONVSERVE_CAPTURE_BELOW="0.97") as server:
        confident = digits(20)
        answers = {}
        for index, body in enumerate(confident):
            top = post(server, body, f"digit-{index}").json()["results"][0]["predictions"][0]
            answers[f"digit-{index}"] = top["probability"]
        pictures = {f"overlaid-{i}": body for i, body in enumerate(overlaid(12))}
        for request_id, body in pictures.items():
            top = post(server, body, request_id).json()["results"][0]["predictions"][0]
            answers[request_id] = top["probability"]
        expected = {rid for rid, p in answers.items() if p < 0.97}
        assert expected & set(pictures), "overlaid digits should leave the network unsure"
        assert len(expected) < len(answers) / 2, "the rule picks, it does not take everything"
        records = captured(folder, len(expected))
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert {r["request_id"] for r in records} == expected
    assert metric_value(text, "convserve_captures_total", model="digits",
                        reason="low_confidence") == len(expected)  # fmt: skip
    for record in records:
        assert record["model"] == "digits"
        assert record["version"] == 1
        assert record["reason"] == "low_confidence"
        predictions = record["predictions"]
        assert isinstance(predictions, list)
        assert predictions[0]["probability"] == pytest.approx(answers[str(record["request_id"])])
        image = folder / "digits" / str(record["file"])
        assert image.suffix == ".png"
        rid = str(record["request_id"])
        original = pictures.get(rid) or confident[int(rid.split("-")[1])]
        assert image.read_bytes() == original  # the bytes sent, not a re-encoding
        assert str(record["time"]).endswith("Z")


def test_classes_sampling_and_the_per_minute_cap(serve: Serve, tmp_path: Path) -> None:
    folder = tmp_path / "captured"
    bodies = digits(12)
    env = {"CONVSERVE_WORKERS": "1", "CONVSERVE_CAPTURE_BELOW": "0",
           "CONVSERVE_CAPTURE_RATE": "1", "CONVSERVE_CAPTURE_PER_MINUTE": "4"}  # fmt: skip
    with serve(**env) as server:
        for index, body in enumerate(bodies):
            post(server, body, f"d{index}")
        time.sleep(1)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    kept = metric_value(text, "convserve_captures_total", reason="sampled")
    dropped = metric_value(text, "convserve_capture_dropped_total", reason="per_minute")
    assert kept + dropped == len(bodies)
    assert 4 <= kept <= 8  # 4 a minute; a minute may turn while they are sent
    assert len(captured(folder, int(kept))) == kept
    wanted = str(held_out_digits(1)[0].label)
    classes = tmp_path / "classes"
    env = {"CONVSERVE_CAPTURE_BELOW": "0", "CONVSERVE_CAPTURE_CLASSES": wanted,
           "CONVSERVE_CAPTURE_DIR": str(classes)}  # fmt: skip
    with serve(**env) as server:
        tops = [post(server, body, f"c{index}").json()["results"][0]["predictions"][0]["label"]
                for index, body in enumerate(bodies)]  # fmt: skip
        records = captured(classes, tops.count(wanted))
    assert tops.count(wanted) >= 1
    assert len(records) == tops.count(wanted)
    assert {r["reason"] for r in records} == {"class"}
    assert all(r["predictions"][0]["label"] == wanted for r in records)  # type: ignore[index]


def test_the_disk_quota_and_a_failing_disk_cost_captures_not_answers(
    serve: Serve, tmp_path: Path
) -> None:
    bodies = [noise(seed) for seed in range(5)]
    with serve(CONVSERVE_CAPTURE_BELOW="1", CONVSERVE_CAPTURE_MB="0") as server:
        for index, body in enumerate(bodies):
            post(server, body, f"q{index}")
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric_value(text, "convserve_capture_dropped_total", reason="quota") == len(bodies)
    assert not list((tmp_path / "captured").glob("*/*"))
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the capture folder's parent should be")
    env = {"CONVSERVE_CAPTURE_BELOW": "1", "CONVSERVE_CAPTURE_DIR": str(blocked / "captured")}
    with serve(**env) as server:
        for index, body in enumerate(bodies):
            post(server, body, f"f{index}")  # every answer is a 200 all the same
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            if metric_value(text, "convserve_capture_dropped_total", reason="disk") == 5:
                break
            time.sleep(0.2)
        log = server.output()
    assert metric_value(text, "convserve_capture_dropped_total", reason="disk") == len(bodies)
    assert "capture: cannot write to" in log
    assert "capturing again in 60 s" in log


def test_the_capture_dir_may_not_be_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    result = run_cli("serve", "--store", BUNDLED_STORE, cwd=tmp_path,
                     CONVSERVE_CAPTURE_DIR=str(BUNDLED_STORE / "captured"))  # fmt: skip
    assert result.returncode == 2
    assert "CONVSERVE_CAPTURE_DIR" in result.stderr
    assert "overlaps the model store" in result.stderr
