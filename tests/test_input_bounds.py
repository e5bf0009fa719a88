"""Client input is bounded before work is done: V2 amplification and element floods, nesting,
out-of-range numbers and Unicode digits all get a quick 4xx problem, never a 500, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.conftest import ready_client
from tests.support import BUNDLED_STORE, held_out_digits, png_bytes

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient
PNG = {"content-type": "image/png"}
INFER = "/v2/models/digits/infer"
QUICK_S = 1.0  # a refused flood answers within this, and never holds up /health/live
VERSIONS = ["²", "①", "٣", "9" * 30, "9" * 5000, "1_0", " 1", "+1"]  # int() takes the last four


def problem(response: httpx.Response, status: int, *fragments: str) -> str:
    """Its detail, after checking status, content type and that the detail says what is wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    detail = str(body["detail"])
    assert "Traceback" not in detail
    assert "internal error" not in detail
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


def fp32(data: Any = None, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    values = [0.0] * 784 if data is None else data
    tensor = {"name": "input", "shape": shape or [1, 1, 28, 28], "datatype": "FP32"}
    return {**tensor, "data": values, **extra}


def classification(k: Any) -> dict[str, Any]:
    return {"inputs": [fp32()], "outputs": [{"name": "probabilities",
                                             "parameters": {"classification": k}}]}  # fmt: skip


def binary_request(elements: bytes, shape: list[int], size: int | None = None) -> dict[str, Any]:
    """Body and headers of a BYTES tensor sent with the binary-data extension."""
    parameters = {"binary_data_size": len(elements) if size is None else size}
    tensor = {"name": "image", "shape": shape, "datatype": "BYTES", "parameters": parameters}
    header = json.dumps({"inputs": [tensor]}).encode()
    return {
        "content": header + elements,
        "headers": {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    }


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


async def still_serves(client: Client) -> None:
    """A normal V2 request and a normal /predict both still get their answer."""
    digit = held_out_digits(1)[0]
    encoded = png_bytes(digit.image)
    response = await client.post(INFER, **binary_request(length_prefixed(encoded), [1]))
    assert response.status_code == 200, response.text
    assert int(np.argmax(response.json()["outputs"][0]["data"])) == digit.label
    response = await client.post("/predict", content=encoded, headers=PNG)
    assert response.status_code == 200
    assert response.json()["results"][0]["predictions"][0]["class_index"] == digit.label


async def refused_quickly(client: Client, status: int, fragment: str, **request: Any) -> None:
    """The flood gets its 4xx within QUICK_S while /health/live keeps answering beside it."""
    started = time.monotonic()
    flood = asyncio.create_task(client.post(INFER, **request))
    while time.monotonic() < started + 10 * QUICK_S:
        # probe every 20 ms until the flood is answered (back to back, the probes would
        # compete with the parsing thread for the GIL)
        if (await asyncio.wait({flood}, timeout=0.02))[0]:
            break
        asked = time.monotonic()
        assert (await client.get("/health/live")).status_code == 200
        assert time.monotonic() - asked < QUICK_S
    problem(await flood, status, fragment)
    assert time.monotonic() - started < QUICK_S
    await still_serves(client)


# ---- outputs: unique and known ---------------------------------------------------------------


async def test_outputs_must_be_unique_and_known(client: Client) -> None:
    twice = {"inputs": [fp32()], "outputs": [{"name": "probabilities"}] * 2}
    problem(await client.post(INFER, json=twice), 400, "'probabilities' is requested 2 times")
    unknown = {"inputs": [fp32()], "outputs": [{"name": "logits"}]}
    problem(await client.post(INFER, json=unknown), 400, "unknown output 'logits'")
    await still_serves(client)


async def test_repeated_outputs_are_not_amplified(client: Client) -> None:
    body = {"inputs": [fp32()], "outputs": [{"name": "probabilities"}] * 20_000}
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    await refused_quickly(client, 400, "is requested 20000 times", content=content, headers=headers)


# ---- BYTES element floods: counted while parsing ---------------------------------------------


async def test_binary_element_flood_is_refused_before_it_is_built(client: Client) -> None:
    empties = b"\0\0\0\0" * 3_000_000  # three million empty elements in 12 MB
    await refused_quickly(client, 413, "the limit is 256", **binary_request(empties, [3_000_000]))
    await refused_quickly(
        client, 400, "more than the 1 elements its shape declares", **binary_request(empties, [1])
    )


async def test_json_element_flood_is_refused_before_it_is_built(client: Client) -> None:
    for shape, status, fragment in [
        ([5_000_000], 413, "5000000 images; the limit is 256"),
        ([1], 400, "holds at least 5000000 elements; its shape [1] declares 1"),
    ]:
        tensor = '{"name":"image","shape":%s,"datatype":"BYTES","data":[%s""]}'
        content = (tensor % (shape, '"",' * 4_999_999)).join(['{"inputs":[', "]}"]).encode()
        headers = {"content-type": "application/json"}
        await refused_quickly(client, status, fragment, content=content, headers=headers)


async def test_metadata_floods_are_refused_before_they_are_built(client: Client) -> None:
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["QQ=="]}
    headers = {"content-type": "application/json"}
    many = {f"k{i}": i for i in range(300_000)}  # 4 MB of parameters
    for body, status, fragment in [
        ({"inputs": [image], "parameters": many}, 413, "besides its tensor data; the limit"),
        ({"inputs": [{**image, "parameters": many}]}, 413, "besides its tensor data"),
        ({"inputs": [image], "id": "x" * 5_000_000}, 413, "besides its tensor data"),
        ({"inputs": [image] * 100_000}, 400, "send exactly one input"),
    ]:
        content = json.dumps(body, separators=(",", ":")).encode()
        await refused_quickly(client, status, fragment, content=content, headers=headers)


async def test_bytes_shape_must_match_the_elements(client: Client) -> None:
    encoded = png_bytes(held_out_digits(1)[0].image)
    response = await client.post(INFER, **binary_request(length_prefixed(encoded), [2]))
    problem(response, 400, "holds 1 elements; its shape declares 2")
    image = {"name": "image", "shape": [3], "datatype": "BYTES",
             "data": [base64.b64encode(encoded).decode()]}  # fmt: skip
    problem(await client.post(INFER, json={"inputs": [image]}), 400, "holds 1 values", "[3]")
    huge = {**image, "shape": [2**31 - 1] * 8}
    problem(await client.post(INFER, json={"inputs": [huge]}), 413, "images; the limit is 256")
    truncated = length_prefixed(encoded)[:-1]
    response = await client.post(INFER, **binary_request(truncated, [1]))
    problem(response, 400, "declares", "fewer follow")
    wrong_size = binary_request(length_prefixed(encoded), [1], size=7)
    problem(await client.post(INFER, **wrong_size), 400, "'binary_data_size' 7 does not match")
    request = binary_request(length_prefixed(encoded), [1])
    request["headers"]["inference-header-content-length"] = "+3"  # int() would take it
    problem(await client.post(INFER, **request), 400, "Inference-Header-Content-Length")
    await still_serves(client)


# ---- numbers: every parameter validated ------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "fragment"),
    [
        ("abc", "'classification' must be an integer >= 1 (classes to return); got 'abc'"),
        (-3, "'classification' must be an integer >= 1 (classes to return); got -3"),
        (0, "got 0"),
        (1.5, "got 1.5"),
        (True, "got True"),
        ({}, "got `object` - at `$.outputs[0].parameters[...]`; parameter values are strings"),
        ([1], "got `array` - at `$.outputs[0].parameters[...]`; parameter values are strings"),
    ],
)
async def test_classification_must_be_a_positive_integer(
    client: Client, k: Any, fragment: str
) -> None:
    problem(await client.post(INFER, json=classification(k)), 400, fragment)
    await still_serves(client)


async def test_classification_is_clipped_to_the_class_count(client: Client) -> None:
    response = await client.post(INFER, json=classification(10**4000))
    assert response.status_code == 200
    (output,) = response.json()["outputs"]
    assert (output["datatype"], output["shape"], len(output["data"])) == ("BYTES", [1, 10], 10)


@pytest.mark.parametrize(
    ("shape", "status", "fragment"),
    [
        ([-5, 1, 28, 28], 400, "every dimension must be an integer from 1 to 2147483647"),
        ([0, 1, 28, 28], 400, "every dimension must be an integer from 1"),
        ([10**4000, 1, 28, 28], 400, "every dimension must be an integer from 1"),
        ([1, 1, 28, 29], 400, "expected [-1, 1, 28, 28]"),
        ([1] * 9, 400, "length <= 8"),
        ([300, 1, 28, 28], 413, "300 images; the limit is 256"),
    ],
)
async def test_fp32_shape_is_checked_before_the_data(
    client: Client, shape: list[int], status: int, fragment: str
) -> None:
    response = await client.post(INFER, json={"inputs": [fp32(shape=shape)]})
    problem(response, status, fragment)
    await still_serves(client)


@pytest.mark.parametrize(
    ("literal", "fragment"),
    [
        ("1" + "0" * 400, "Number out of range"),  # 1e400 written as an integer
        ("1e400", "Number out of range"),
        ("1e39", "beyond the FP32 range"),  # finite in float64, infinite in float32
        ('"1"', "must be numbers"),
        ("true", "must be numbers"),
    ],
)
async def test_fp32_values_out_of_range_are_refused(
    client: Client, literal: str, fragment: str
) -> None:
    data = "[" + ",".join([literal] + ["0"] * 783) + "]"
    content = '{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":%s}]}'
    headers = {"content-type": "application/json"}
    problem(await client.post(INFER, content=content % data, headers=headers), 400, fragment)
    await still_serves(client)


async def test_fp32_data_must_fill_its_shape(client: Client) -> None:
    problem(await client.post(INFER, json={"inputs": [fp32([0.0] * 785)]}), 400, "more than")
    problem(await client.post(INFER, json={"inputs": [fp32([0.0] * 783)]}), 400, "783 values")
    ragged = [[[[0.0] * 28] * 27]]
    problem(await client.post(INFER, json={"inputs": [fp32(ragged)]}), 400, "nested 'data'")
    nested = [[[[0.0] * 28] * 28]]  # the protocol allows data nested as its shape
    assert (await client.post(INFER, json={"inputs": [fp32(nested)]})).status_code == 200


# ---- nesting ---------------------------------------------------------------------------------


IMAGE = '{"name":"image","shape":[1],"datatype":"BYTES","data":["QQ=="]'


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ('{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":DEEP}]}',
         "nested"),
        ('{"inputs":[IMAGE,"parameters":{"x":DEEP}}]}',
         "got `array` - at `$.inputs[0].parameters[...]`"),
        ('{"inputs":[IMAGE}],"outputs":[{"name":"probabilities","parameters":{"x":DEEP}}]}',
         "got `array` - at `$.outputs[0].parameters[...]`"),
        ('{"inputs":[IMAGE}],"extra":DEEP}', "unknown field `extra`"),
        ("DEEP", "Expected `object`, got `array`"),
    ],
)  # fmt: skip
async def test_deeply_nested_json_is_refused(client: Client, where: str, fragment: str) -> None:
    headers = {"content-type": "application/json"}
    for depth in (33, 1000, 100_000):
        content = where.replace("IMAGE", IMAGE).replace("DEEP", "[" * depth + "]" * depth)
        detail = problem(await client.post(INFER, content=content, headers=headers), 400)
        # refused by the typed schema where it is read, or while skipping past it when deeper
        # than the interpreter's recursion limit
        assert fragment in detail or "JSON nested deeper than 11 levels" in detail, detail
    await still_serves(client)


# ---- versions: ASCII digits only -------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_versions_are_ascii_digits_on_every_route(client: Client, version: str) -> None:
    image = {"content": png_bytes(held_out_digits(1)[0].image), "headers": PNG}
    query: dict[str, Any] = {"params": {"version": version}, **image}
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/predict", query),
        ("POST", "/models/digits/predict", query),
        ("POST", "/models/digits/layers/conv1/maps", query),
        ("GET", f"/models/digits/{version}", {}),
        ("GET", f"/v2/models/digits/versions/{version}", {}),
        ("GET", f"/v2/models/digits/versions/{version}/ready", {}),
        ("POST", f"/v2/models/digits/versions/{version}/infer", {"json": classification(1)}),
    ]
    for method, path, request in requests:
        response = await client.request(method, path, **request)
        problem(response, 404, "ASCII digits", version[:20])
    await still_serves(client)


async def test_management_versions_are_ascii_digits() -> None:
    settings = Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_API_KEY": "k"})
    async with ready_client(settings) as client:
        key = {"authorization": "Bearer k"}
        for version in VERSIONS:
            for action in ("load", "reload", "unload"):
                path = f"/models/digits/versions/{version}/{action}"
                response = await client.post(path, headers=key)
                problem(response, 404, "ASCII digits", version[:20])
        listing = (await client.get("/store", headers=key)).json()
        assert {"version": 1, "status": "ready"} in listing["models"][0]["versions"]
        await still_serves(client)


# ---- REST query parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"top_k": "9" * 5000}, "top_k"),
        ({"top_k": "²"}, "top_k"),
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "-1"}, "top_k"),
        ({"heatmap": "gradcam", "target": str(10**30)}, "out of range"),
        ({"heatmap": "gradcam", "target": "①"}, "target"),
        ({"heatmap": "gradcam", "target": "-1"}, "target"),
    ],
)
async def test_predict_query_numbers_are_validated(
    client: Client, params: dict[str, str], fragment: str
) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    response = await client.post("/predict", params=params, content=body, headers=PNG)
    problem(response, 422, fragment)
    await still_serves(client)


async def test_huge_top_k_is_clipped(client: Client) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    params = {"top_k": str(10**30)}
    response = await client.post("/predict", params=params, content=body, headers=PNG)
    assert response.status_code == 200
    assert len(response.json()["results"][0]["predictions"]) == 10
