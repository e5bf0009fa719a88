"""Open Inference Protocol endpoints, driven by the official Triton HTTP client and by
requests written from the KServe V2 specification."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.imaging import DecodeLimits, prepare_image
from service.spec import read_spec
from tests.support import BUNDLED_STORE, ServerProcess, held_out_digits, png_bytes, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("v2")) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield connection
    connection.close()


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("lenet5", "1")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "convserve"
    metadata = client.get_model_metadata("digits")
    assert metadata["versions"] == ["1"]
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_images_through_the_official_client(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    digits = held_out_digits(6)
    encoded = [png_bytes(d.image) for d in digits]
    if not binary:  # in JSON, BYTES elements carry the files base64-encoded
        encoded = [base64.b64encode(e) for e in encoded]
    image = triton.InferInput("image", [len(encoded)], "BYTES")
    image.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=binary)
    result = client.infer("digits", [image], model_version="1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (6, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities.argmax(axis=1).tolist() == [d.label for d in digits]
    assert result.get_response()["model_version"] == "1"


def test_fp32_tensors_and_classification(client: triton.InferenceServerClient) -> None:
    spec = read_spec(BUNDLED_STORE / "lenet5" / "1" / "model.json")
    digits = held_out_digits(4)
    batch = np.stack(
        [prepare_image(png_bytes(d.image), spec.input, DecodeLimits(10**6)).array for d in digits]
    )
    for binary in (True, False):
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        wanted = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=2)
        result = client.infer("lenet5", [tensor], outputs=[wanted], request_id="abc")
        top = result.as_numpy("probabilities")
        assert top.shape == (4, 2)
        for row, digit in zip(top, digits, strict=True):
            probability, index, label = str(row[0]).split(":")
            assert int(index) == digit.label
            assert label == str(digit.label)
            assert float(probability) > 0.5
        assert result.get_response()["id"] == "abc"


def test_errors_reach_the_client(client: triton.InferenceServerClient) -> None:
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="cannot identify an image"):
        client.infer("digits", [image])
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.infer("nope", [image])
    wrong = triton.InferInput("input", [1, 3, 28, 28], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected \[-1, 1, 28, 28\]"):
        client.infer("digits", [wrong])


def test_requests_written_from_the_spec(server: ServerProcess) -> None:
    digit = held_out_digits(1)[0]
    body = {
        "id": "42",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(png_bytes(digit.image)).decode()]}],
    }  # fmt: skip
    response = httpx.post(f"{server.url}/v2/models/digits/versions/1/infer", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["model_name"] == "digits"
    assert answer["id"] == "42"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [1, 10],
    )
    assert int(np.argmax(output["data"])) == digit.label
    assert httpx.get(f"{server.url}/v2").json()["extensions"] == [
        "classification",
        "binary_tensor_data",
        "model_configuration",
        "statistics",
    ]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    ready = httpx.get(f"{server.url}/v2/models/digits/versions/1/ready")
    assert ready.json() == {"name": "digits", "ready": True}
    missing = httpx.get(f"{server.url}/v2/models/digits/versions/9/ready")
    assert missing.status_code == 404
    assert "no version 9" in missing.json()["error"]
    bad = httpx.post(f"{server.url}/v2/models/digits/infer", json={"inputs": "nope"})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"
    assert "not an inference request" in bad.json()["error"]


def test_v2_requests_are_counted_per_model(server: ServerProcess, tmp_path: Path) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    assert 'convserve_requests_total{model="digits",status="200",version="1"}' in text
