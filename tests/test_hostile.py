"""Hostile and odd inputs: each gets its documented status as problem+json, and the service
keeps serving. Also: broken HTTP framing, path escapes and pickled weights."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import main
from service.errors import ModelLoadError
from service.spec import sha256_file
from service.store import ModelStore
from tests.corpus import MANIFEST, REQUESTS, UPLOADS, Reply, case_bytes, send
from tests.data.make_corpus import HERE as CORPUS
from tests.data.make_corpus import cases, file_name
from tests.support import (
    BUNDLED_STORE,
    ServerProcess,
    exchange,
    held_out_digits,
    png_bytes,
    running_server,
)

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


async def still_serves(client: httpx.AsyncClient) -> None:
    digit = held_out_digits(1)[0]
    response = await client.post("/predict", content=png_bytes(digit.image), headers=PNG)
    assert response.status_code == 200
    assert response.json()["results"][0]["predictions"][0]["class_index"] == digit.label


@pytest.mark.parametrize("case", UPLOADS, ids=[c["name"] for c in UPLOADS])
async def test_corpus_case_gets_its_documented_answer(
    client: httpx.AsyncClient, case: dict[str, Any]
) -> None:
    body = case_bytes(case)
    response = await client.post(
        "/predict", content=body, headers={"content-type": case["content_type"]}
    )
    assert response.status_code == case["status"], response.text
    if case["status"] == 200:
        assert response.headers["content-type"] == "application/json"
        if "label" in case:
            top = response.json()["results"][0]["predictions"][0]["class_index"]
            assert top == case["label"]
    else:
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == case["status"]
        assert case["detail"] in problem["detail"]
        assert "Traceback" not in problem["detail"]
    await still_serves(client)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real uvicorn process: header and request-line limits live in its HTTP protocol."""
    with running_server(tmp_path_factory.mktemp("hostile")) as process:
        yield process


def check_reply(case: dict[str, Any], reply: Reply) -> None:
    """The documented status as problem+json with its detail fragment (or a closed socket)."""
    assert reply.outcome == case["status"], (case["name"], reply.outcome, reply.body[:300])
    if reply.status is None or reply.status == 200:
        return
    assert reply.headers["content-type"] == "application/problem+json", reply.headers
    problem = reply.problem()
    assert problem["status"] == case["status"]
    assert case["detail"] in problem["detail"], problem["detail"]
    assert "Traceback" not in problem["detail"]


@pytest.mark.parametrize("case", REQUESTS, ids=[c["name"] for c in REQUESTS])
def test_request_case_gets_its_documented_answer(
    server: ServerProcess, case: dict[str, Any]
) -> None:
    check_reply(case, send(server.url, case_bytes(case), timeout=20))
    ok = httpx.post(f"{server.url}/predict", content=png_bytes(held_out_digits(1)[0].image),
                    headers=PNG)  # fmt: skip
    assert ok.status_code == 200


def test_corpus_matches_its_generator() -> None:
    generated = {entry["name"]: entry for entry, _ in cases()}
    recorded = {
        entry["name"]: {k: v for k, v in entry.items() if k != "file"} for entry in MANIFEST
    }
    assert recorded == generated
    assert all(c["file"] == file_name(c) for c in MANIFEST)
    assert {p.name for p in CORPUS.iterdir()} == {"manifest.json", *(c["file"] for c in MANIFEST)}


def test_broken_http_framing(tmp_path: Path) -> None:
    image = png_bytes(held_out_digits(1)[0].image)
    with running_server(tmp_path, {"CONVSERVE_DEADLINE_MS": "1500"}) as server:
        # Content-Length shorter than the body: the image arrives cut, the rest is garbage
        short = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 40\r\n\r\n" + image
        )
        answer = exchange(server.url, short)
        assert answer.startswith(b"HTTP/1.1 400")
        assert b"application/problem+json" in answer.split(b"\r\n\r\n")[0]
        # Content-Length longer than what is sent: the server stops waiting at the deadline
        stalled = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + image
        )
        started = time.monotonic()
        answer = exchange(server.url, stalled, timeout=8)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive before the deadline" in answer
        assert time.monotonic() - started < 6
        ok = httpx.post(f"{server.url}/predict", content=image, headers=PNG)
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/models/..%2F..%2Fetc%2Fpasswd",
        "/models/%2e%2e%2f%2e%2e%2fetc/1",
        "/models/..%5C..%5Cwindows/1",
        "/models/digits%2F..%2Flenet5",
        "/v2/models/..%2Fdigits",
        "/v2/models/%2e%2e/versions/1/ready",
        "/models/digits/..%2F..%2F1",
    ],
)
async def test_the_store_cannot_be_escaped(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "..", "digits/../lenet5", "..\\..\\x", "%2e%2e", "/etc/passwd"]
)
async def test_model_names_in_queries_cannot_escape(client: httpx.AsyncClient, name: str) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    response = await client.post("/predict", params={"model": name}, content=body, headers=PNG)
    assert response.status_code == 404
    assert "no model named" in response.json()["detail"]
    version = await client.post("/predict", params={"version": name}, content=body, headers=PNG)
    assert version.status_code == 404


class Payload:
    """Unpickling this writes a file: proof that something executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on our fake
def test_weights_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    store = tmp_path / "store"
    folder = store / "digits" / "1"
    folder.mkdir(parents=True)
    spec = json.loads((BUNDLED_STORE / "digits" / "1" / "model.json").read_text())
    weights = folder / "weights.safetensors"
    weights.write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}))
    (folder / "model.json").write_text(json.dumps({**spec, "sha256": sha256_file(weights)}))
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        ModelStore(store).load("digits", 1, __import__("torch").device("cpu"))
    # `convserve import --weights` reads .pth files with torch's tensors-only loader
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
    assert main(["import", "resnet18", "--weights", str(evil), "--store", str(store)]) == 1
    assert not marker.exists()
