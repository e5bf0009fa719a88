"""Open Inference Protocol (KServe V2 / Triton HTTP) endpoints, so existing clients work.

Inputs: one BYTES tensor of encoded image files (base64 strings in JSON, raw bytes with the
binary-data extension), or one FP32 tensor already preprocessed to the model's (N, C, H, W).
Output: `probabilities` FP32 (N, classes); with `"parameters": {"classification": k}` the
top k as BYTES "probability:index:label" (Triton's classification extension).
Bodies are read and bounded by service.tensors, large ones off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import msgspec
import numpy as np
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath

from service import __version__
from service.api.access import annotate, annotate_answer
from service.api.dependencies import RequestsDep
from service.api.hangup import unless_hung_up
from service.api.openapi import InferOperation, problems
from service.api.uploads import read_body
from service.errors import ModelNotReadyError
from service.inference import Requests, Route
from service.tensors import BINARY_HEADER, OUTPUT, Limits, parse_request, top_rows

OFF_LOOP_BYTES = 1 << 20  # bodies above this are parsed in a worker thread


class TensorSpec(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Readiness(msgspec.Struct):
    name: str
    ready: bool


class OutputTensor(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


@get("/v2", summary="Open Inference Protocol: server metadata")
async def server_metadata() -> ServerMetadata:
    extensions = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
    return ServerMetadata("convserve", __version__, extensions)


@get("/v2/health/live", summary="Open Inference Protocol: liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@get(
    "/v2/health/ready",
    summary="Open Inference Protocol: readiness (503 until ready)",
    responses=problems(503),
)
async def server_ready(requests: RequestsDep) -> dict[str, bool]:
    if not requests.ready:
        raise ModelNotReadyError(
            "not ready: models are loading or the server is draining", retry_after=1
        )
    return {"ready": True}


def _outputs(top_k: int | None, probabilities: np.ndarray, labels: list[str]) -> OutputTensor:
    """`probabilities` as FP32 (N, classes), or its top k as BYTES "probability:index:label"."""
    if top_k is None:
        return OutputTensor(
            OUTPUT, "FP32", list(probabilities.shape), probabilities.reshape(-1).tolist()
        )
    rows = top_rows(top_k, probabilities, labels)
    return OutputTensor(OUTPUT, "BYTES", [len(probabilities), top_k], rows)


async def _infer(
    request: Request[Any, Any, Any], requests: Requests, name: str, version: str | None
) -> InferResponse:
    deadline = time.monotonic() + requests.settings.deadline_s
    read = partial(read_body, request, requests.settings, deadline)

    def routed(route: Route) -> None:  # noted before the body: its refusal counts for the model
        annotate(request, model=route.name, version=route.version)

    first, body = await requests.route_body(name, version, read, routed)
    limits = Limits(requests.settings.max_images, first.input_shape, len(first.labels))
    header_length = request.headers.get(BINARY_HEADER)
    if len(body) > OFF_LOOP_BYTES:  # decoding a large body would hold up every other request
        parsed = await asyncio.to_thread(parse_request, body, header_length, limits)
    else:
        parsed = parse_request(body, header_length, limits)
    work = requests.classify(first, name, version, parsed.items, deadline)
    classified = await unless_hung_up(request, work)
    route = classified.route
    annotate_answer(request, classified)
    probabilities = np.stack([a.probabilities for a in classified.answers])
    return InferResponse(
        model_name=route.name,
        model_version=str(route.version),
        outputs=[_outputs(parsed.top_k, probabilities, route.labels)],
        id=parsed.id,
    )


@post(["/v2/models/{name:str}/infer", "/v2/models/{name:str}/versions/{version:str}/infer"],
      summary="Open Inference Protocol: classify (BYTES images or an FP32 NCHW tensor)",
      status_code=200, operation_class=InferOperation,
      responses=problems(400, 404, 408, 413, 415, 500, 503, 504))  # fmt: skip
async def infer(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    name: FromPath[str],
    version: FromPath[str | None] = None,
) -> Response[InferResponse]:
    with requests.admitted():
        return Response(await _infer(request, requests, name, version))


v2 = Router(
    path="/",
    route_handlers=[server_metadata, server_live, server_ready, infer],
    tags=["open inference protocol"],
)
