"""OpenTelemetry traces, exported over OTLP/HTTP to a receiver started here, decoded from
protobuf: each request's span and its stages, the caller's traceparent honoured, the trace id
in the access log, and batch spans linked to the requests they served."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support import (
    ServerProcess,
    digit_picture,
    held_out_digits,
    png_bytes,
    running_server,
)

PNG = {"content-type": "image/png"}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Span:
    name: str
    trace: str
    span: str
    parent: str
    links: list[str]  # span ids
    attributes: dict[str, object]
    process: str  # the convserve.process resource attribute
    start: int  # ns since the epoch
    end: int


def _value(value: object) -> object:
    which = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, which) if which else None


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, protobuf bodies."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found = Span(
                        span.name,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        [link.span_id.hex() for link in span.links],
                        {a.key: _value(a.value) for a in span.attributes},
                        str(resource.get("convserve.process")),
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                    )
                    with self.lock:
                        self.spans.append(found)

    def wait_for(self, check: object, timeout: float = 20.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if check(spans):  # type: ignore[operator]
                return spans
            assert time.monotonic() < deadline, [(s.name, s.process) for s in spans]
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.close()


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {s.name: s for s in spans if s.parent == parent.span and s.trace == parent.trace}


def access_line(server: ServerProcess, response: httpx.Response) -> dict[str, object]:
    """The JSON access-log line of `response` (written just after the response is sent)."""
    deadline = time.monotonic() + 10
    while True:
        for line in server.output().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("request_id") == response.headers["x-request-id"]:
                    return dict(record)
        assert time.monotonic() < deadline, "no access-log line"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_requests_and_batches_are_traced(tmp_path: Path, receiver: Receiver, workers: str) -> None:
    env = {"CONVSERVE_WORKERS": workers, "CONVSERVE_LOG_FORMAT": "json",
           "CONVSERVE_MAX_DELAY_MS": "300", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}  # fmt: skip
    first, *others = [png_bytes(digit_picture(d)) for d in held_out_digits(41, seed=21)]
    with running_server(tmp_path, env) as server:
        traced = httpx.post(
            f"{server.url}/predict?heatmap=gradcam",
            content=first,
            headers={**PNG, "traceparent": f"00-{TRACE}-{PARENT}-01"},
        )
        assert traced.status_code == 200, traced.text
        ids: list[str] = []

        def post(body: bytes) -> str:
            return httpx.post(f"{server.url}/predict", content=body, headers=PNG).headers[
                "x-request-id"
            ]

        def complete(spans: list[Span]) -> bool:
            requests = [s for s in spans if s.attributes.get("convserve.request_id") in ids]
            linked = {link for s in spans if s.name == "batch" for link in s.links}
            mine = [s for s in spans if s.trace == TRACE and s.name == "POST /predict"]
            return (
                len(requests) == len(ids)
                and all(r.span in linked for r in requests)
                and bool(mine)
                and "overlay" in children(spans, mine[0])
            )

        def shared(spans: list[Span]) -> bool:
            return any(len(s.links) > 1 for s in spans if s.name == "batch")

        # rounds of four at once (new images: no cache hits) until two share a forward pass
        for start in range(0, len(others), 4):
            with ThreadPoolExecutor(4) as pool:
                ids += pool.map(post, others[start : start + 4])
            if shared(receiver.wait_for(complete)):
                break

        spans = receiver.wait_for(complete)
        (request,) = [s for s in spans if s.trace == TRACE and s.name == "POST /predict"]
        assert request.parent == PARENT  # the caller's traceparent is honoured
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["convserve.model"] == "digits"
        stages = children(spans, request)
        assert {"read body", "decode and preprocess", "queue wait", "inference", "overlay"} <= set(
            stages
        )
        assert stages["queue wait"].process == request.process  # the worker that had it
        batches = [s for s in spans if s.name == "batch" and request.span in s.links]
        assert len(batches) == 1
        assert batches[0].attributes["convserve.kind"] == "gradcam"
        assert batches[0].process == ("single" if workers == "0" else "model")
        # the concurrent requests rode in batches that link each of them, some of them shared
        linked = [s for s in spans if s.name == "batch" and s.links and request.span not in s.links]
        sizes = sum(int(str(s.attributes["convserve.batch_size"])) for s in linked)
        assert sizes >= len(ids)
        assert shared(linked), [s.links for s in linked]
        spans_of = {s.span for s in spans if s.attributes.get("convserve.request_id") in ids}
        assert {link for s in linked for link in s.links} <= spans_of
        assert access_line(server, traced)["trace_id"] == TRACE


def test_tracing_is_off_without_an_exporter(tmp_path: Path) -> None:
    env = {"CONVSERVE_WORKERS": "0", "CONVSERVE_LOG_FORMAT": "json"}
    with running_server(tmp_path, env) as server:
        body = png_bytes(held_out_digits(1)[0].image)
        answer = httpx.post(
            f"{server.url}/predict",
            content=body,
            headers={**PNG, "traceparent": f"00-{TRACE}-{PARENT}-01"},
        )
        assert answer.status_code == 200
        assert "trace_id" not in access_line(server, answer)
        assert "opentelemetry.sdk" not in server.output()


def test_grpc_calls_are_traced_too(tmp_path: Path, receiver: Receiver) -> None:
    env = {"CONVSERVE_WORKERS": "2", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}  # fmt: skip
    body = png_bytes(digit_picture(held_out_digits(1, seed=22)[0]))
    with running_server(tmp_path, env) as server:
        client = tgrpc.InferenceServerClient(server.grpc)
        tensor = tgrpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([body], dtype=np.object_))
        client.infer("digits", [tensor], headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})

        def complete(spans: list[Span]) -> bool:
            mine = [s for s in spans if s.trace == TRACE and s.name == "ModelInfer"]
            linked = {link for s in spans if s.name == "batch" for link in s.links}
            return (
                bool(mine) and mine[0].span in linked and "queue wait" in children(spans, mine[0])
            )

        spans = receiver.wait_for(complete)
        (call,) = [s for s in spans if s.trace == TRACE and s.name == "ModelInfer"]
        assert call.parent == PARENT
        assert call.attributes["rpc.system"] == "grpc"
        assert call.attributes["convserve.model"] == "digits"
        assert {"decode and preprocess", "queue wait", "inference"} <= set(children(spans, call))
