"""Open Inference Protocol (KServe V2 / Triton HTTP) endpoints, so existing clients work.

Inputs: one BYTES tensor of encoded image files (base64 strings in JSON, raw bytes with the
binary-data extension), or one FP32 tensor already preprocessed to the model's (N, C, H, W).
Output: `probabilities` FP32 (N, classes); with `"parameters": {"classification": k}` the
top k as BYTES "probability:index:label" (Triton's classification extension).
Bodies are read and bounded by service.api.tensors, large ones off the event loop.
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
from service.api.access import annotate
from service.api.classify import classify, route_body
from service.api.dependencies import RuntimeDep
from service.api.hangup import unless_hung_up
from service.api.openapi import InferOperation, problems
from service.api.tensors import BINARY_HEADER, OUTPUT, Limits, parse_request
from service.api.uploads import read_body
from service.catalog import Deployment
from service.errors import ModelNotReadyError
from service.runtime import Runtime

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
    return ServerMetadata("convserve", __version__, ["classification", "binary_tensor_data"])


@get("/v2/health/live", summary="Open Inference Protocol: liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@get(
    "/v2/health/ready",
    summary="Open Inference Protocol: readiness (503 until ready)",
    responses=problems(503),
)
async def server_ready(runtime: RuntimeDep) -> dict[str, bool]:
    if not runtime.ready:
        raise ModelNotReadyError(
            "not ready: models are loading or the server is draining", retry_after=1
        )
    return {"ready": True}


def _metadata(deployment: Deployment, versions: list[str]) -> ModelMetadata:
    classifier = deployment.classifier
    channels, height, width = classifier.input_shape
    return ModelMetadata(
        name=classifier.name,
        versions=versions,
        platform=f"pytorch_{classifier.spec.architecture}",
        inputs=[
            TensorSpec("image", "BYTES", [-1]),
            TensorSpec("input", "FP32", [-1, channels, height, width]),
        ],
        outputs=[TensorSpec("probabilities", "FP32", [-1, len(classifier.labels)])],
    )


@get(["/v2/models/{name:str}", "/v2/models/{name:str}/versions/{version:str}"],
     summary="Open Inference Protocol: model metadata", responses=problems(404, 503))  # fmt: skip
async def model_metadata(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> ModelMetadata:
    deployment = runtime.catalog.resolve(name, version)
    entry = runtime.catalog.entry(name)
    return _metadata(deployment, [str(v) for v in sorted(entry.deployments)])


@get(["/v2/models/{name:str}/ready", "/v2/models/{name:str}/versions/{version:str}/ready"],
     summary="Open Inference Protocol: model readiness (503 when not ready)",
     responses=problems(404, 503))  # fmt: skip
async def model_ready(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> Readiness:
    runtime.catalog.resolve(name, version)  # 404 unknown, 503 not ready
    return Readiness(name, True)


def _outputs(top_k: int | None, probabilities: np.ndarray, labels: list[str]) -> OutputTensor:
    """`probabilities` as FP32 (N, classes), or its top k as BYTES "probability:index:label"."""
    if top_k is None:
        return OutputTensor(
            OUTPUT, "FP32", list(probabilities.shape), probabilities.reshape(-1).tolist()
        )
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    rows = [f"{p[i]:f}:{i}:{labels[i]}" for p, top in zip(probabilities, order, strict=True)
            for i in top]  # fmt: skip
    return OutputTensor(OUTPUT, "BYTES", [len(probabilities), top_k], rows)


async def _infer(
    request: Request[Any, Any, Any], runtime: Runtime, name: str, version: str | None
) -> InferResponse:
    deadline = time.monotonic() + runtime.settings.deadline_s
    read = partial(read_body, request, runtime.settings, deadline)
    deployment, body = await route_body(runtime, name, version, read)
    classifier = deployment.classifier
    annotate(request, model=classifier.name, version=classifier.version)
    limits = Limits(runtime.settings.max_images, classifier.input_shape, len(classifier.labels))
    header_length = request.headers.get(BINARY_HEADER)
    if len(body) > OFF_LOOP_BYTES:  # decoding a large body would hold up every other request
        parsed = await asyncio.to_thread(parse_request, body, header_length, limits)
    else:
        parsed = parse_request(body, header_length, limits)
    work = classify(runtime, deployment, parsed.items, deadline)
    outcomes, _ = await unless_hung_up(request, work)
    annotate(request, batch_size=max(o.batch_size for o in outcomes))
    probabilities = np.stack([o.probabilities for o in outcomes])
    return InferResponse(
        model_name=classifier.name,
        model_version=str(classifier.version),
        outputs=[_outputs(parsed.top_k, probabilities, classifier.labels)],
        id=parsed.id,
    )


@post(["/v2/models/{name:str}/infer", "/v2/models/{name:str}/versions/{version:str}/infer"],
      summary="Open Inference Protocol: classify (BYTES images or an FP32 NCHW tensor)",
      status_code=200, operation_class=InferOperation,
      responses=problems(400, 404, 408, 413, 415, 500, 503, 504))  # fmt: skip
async def infer(
    request: Request[Any, Any, Any],
    runtime: RuntimeDep,
    name: FromPath[str],
    version: FromPath[str | None] = None,
) -> Response[InferResponse]:
    with runtime.admitted():
        return Response(await _infer(request, runtime, name, version))


v2 = Router(
    path="/",
    route_handlers=[server_metadata, server_live, server_ready, model_metadata, model_ready, infer],
    tags=["open inference protocol"],
)
