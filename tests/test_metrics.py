"""/metrics: every documented metric, low-cardinality labels, OpenMetrics, several workers, and
structured access logs carrying the request id."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import held_out_digits, metric_value, png_bytes, running_server

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}
DOCUMENTED = {
    "convserve_requests": "counter",
    "convserve_images": "counter",
    "convserve_rejected": "counter",
    "convserve_request_duration_seconds": "histogram",
    "convserve_queue_wait_seconds": "histogram",
    "convserve_preprocess_seconds": "histogram",
    "convserve_inference_seconds": "histogram",
    "convserve_batch_size": "histogram",
    "convserve_top_probability": "histogram",
    "convserve_queue_depth": "gauge",
    "convserve_inflight_requests": "gauge",
    "convserve_model_info": "gauge",
    "convserve_model_load_seconds": "gauge",
}


async def test_every_documented_metric_is_exported(client: httpx.AsyncClient) -> None:
    await client.post("/predict", content=png_bytes(held_out_digits(1)[0].image), headers=PNG)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    for name, kind in DOCUMENTED.items():
        assert families.get(name) == kind, name
    info = metric_value(
        response.text,
        "convserve_model_info",
        model="digits",
        version="1",
        architecture="small_cnn",
        device="cpu",
    )
    assert info == 1


async def test_latency_buckets_resolve_milliseconds(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    bounds = {
        float(sample.labels["le"])
        for family in text_string_to_metric_families(text)
        if family.name == "convserve_request_duration_seconds"
        for sample in family.samples
        if "le" in sample.labels and sample.labels["le"] != "+Inf"
    }
    assert {0.001, 0.002, 0.005, 0.01} <= bounds


async def test_labels_never_carry_raw_request_values(client: httpx.AsyncClient) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    await client.post("/predict?model=sneaky-user-value&version=9999", content=body, headers=PNG)
    await client.post("/models/another-sneaky-name/predict", content=body, headers=PNG)
    text = (await client.get("/metrics")).text
    values = {
        value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert not [v for v in values if "sneaky" in v or v == "9999"]
    assert metric_value(text, "convserve_requests_total", model="-", status="404") >= 2


JSON = {"content-type": "application/json"}
REFUSED = [  # (path, headers, body, labels its 4xx counts under)
    ("/predict?model=lenet5", PNG, b"junk", ("lenet5", "1", "400")),
    ("/models/digits/predict", PNG, b"junk", ("digits", "1", "400")),
    ("/predict?model=lenet5", {"content-type": "text/plain"}, b"hi", ("lenet5", "1", "415")),
    ("/models/lenet5/predict?top_k=0", PNG, b"junk", ("lenet5", "1", "422")),  # before routing
    ("/predict?top_k=0", PNG, b"junk", ("digits", "1", "422")),  # the default model
    ("/predict?model=digits&heatmap=gradcam&layer=fc9", PNG, b"junk", ("digits", "1", "404")),
    ("/predict?model=digits&version=7", PNG, b"junk", ("digits", "-", "404")),
    ("/v2/models/lenet5/infer", JSON, b"{}", ("lenet5", "1", "400")),
    ("/v2/models/lenet5/versions/8/infer", JSON, b"{}", ("lenet5", "-", "404")),
    ("/predict?model=nosuch", PNG, b"junk", ("-", "-", "404")),
]


def counted(text: str, labels: tuple[str, str, str]) -> float:
    model, version, status = labels
    return metric_value(
        text, "convserve_requests_total", model=model, version=version, status=status
    )


async def test_a_known_models_4xx_counts_under_its_name(client: httpx.AsyncClient) -> None:
    """Refusals before or after routing; an unknown version of a known model under the model
    with version "-"; an unknown model stays "-"."""
    before = (await client.get("/metrics")).text
    for path, headers, body, labels in REFUSED:
        response = await client.post(path, content=body, headers=headers)
        assert response.status_code == int(labels[2]), (path, response.text)
    after = (await client.get("/metrics")).text
    for labels in {labels for *_, labels in REFUSED}:
        sent = sum(1 for *_, other in REFUSED if other == labels)
        assert counted(after, labels) - counted(before, labels) == sent, labels


async def test_openmetrics_when_asked(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_json_access_logs_carry_the_request_id(tmp_path: Path) -> None:
    with running_server(tmp_path, {"CONVSERVE_LOG_FORMAT": "json"}) as server:
        body = png_bytes(held_out_digits(1)[0].image)
        mine = httpx.post(
            f"{server.url}/predict", content=body, headers={**PNG, "x-request-id": "trace-42"}
        )
        assert mine.headers["x-request-id"] == "trace-42"
        minted = httpx.post(f"{server.url}/predict", content=body, headers=PNG)
        assert len(minted.headers["x-request-id"]) == 32
        evil = httpx.get(f"{server.url}/health/live", headers={"x-request-id": "a b\tc" * 50})
        assert evil.headers["x-request-id"] != "a b\tc" * 50
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if "request_id" in line}
    entry = access["trace-42"]
    assert entry["method"] == "POST"
    assert entry["path"] == "/predict"
    assert entry["status"] == 200
    assert entry["model"] == "digits"
    assert entry["version"] == 1
    assert entry["batch_size"] == 1
    assert entry["latency_ms"] > 0
    assert minted.headers["x-request-id"] in access


def test_several_workers_report_one_aggregate(tmp_path: Path) -> None:
    with running_server(tmp_path, {"CONVSERVE_WORKERS": "2"}) as server:
        digits = [png_bytes(d.image) for d in held_out_digits(30)]  # each one computed
        with httpx.Client(base_url=server.url) as client:
            for body in digits:
                # a fresh connection each time, so both workers take requests
                assert (
                    httpx.post(f"{server.url}/predict", content=body, headers=PNG).status_code
                    == 200
                )
            text = client.get("/metrics").text
        served = metric_value(text, "convserve_requests_total", model="digits", status="200")
        assert served == 30
        assert metric_value(text, "convserve_images_total", model="digits") == 30
