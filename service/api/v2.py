"""Open Inference Protocol (KServe V2 / Triton HTTP) endpoints, so existing clients work.

Inputs: one BYTES tensor of encoded image files (base64 strings in JSON, raw bytes with the
binary-data extension), or one FP32 tensor already preprocessed to the model's (N, C, H, W).
Output: `probabilities` FP32 (N, classes); with `"parameters": {"classification": k}` the
top k as BYTES "probability:index:label" (Triton's classification extension).
"""

from __future__ import annotations

import base64
import binascii
import struct
import time
from typing import Any

import msgspec
import numpy as np
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath

from service import __version__
from service.api.access import annotate
from service.api.classify import classify
from service.api.openapi import InferOperation, problems
from service.api.uploads import Upload, read_body
from service.catalog import Deployment
from service.errors import BadRequestError, ModelNotReadyError, PayloadTooLargeError
from service.runtime import Runtime, RuntimeDep

BINARY_HEADER = "inference-header-content-length"


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


class InputTensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class InferRequest(msgspec.Struct):
    inputs: list[InputTensor]
    id: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None


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


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequestError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise BadRequestError("Inference-Header-Content-Length exceeds the body")
    return body[:length], body[length:]


def _bytes_elements(tensor: InputTensor, binary: bytes) -> list[bytes]:
    """BYTES elements: base64 strings in JSON, or length-prefixed raw bytes (binary extension)."""
    if "binary_data_size" in tensor.parameters:
        elements, offset = [], 0
        while offset < len(binary):
            if offset + 4 > len(binary):
                raise BadRequestError("truncated BYTES element in the binary data")
            (size,) = struct.unpack_from("<I", binary, offset)
            elements.append(binary[offset + 4 : offset + 4 + size])
            offset += 4 + size
        return elements
    data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
    flat = np.asarray(data, dtype=object).reshape(-1).tolist()
    try:
        return [base64.b64decode(str(item), validate=True) for item in flat]
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"input {tensor.name!r}: BYTES elements must be base64-encoded image files"
        ) from None


def _fp32_arrays(
    tensor: InputTensor, binary: bytes, shape: tuple[int, int, int]
) -> list[np.ndarray]:
    expected = [-1, *shape]
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != shape:
        raise BadRequestError(
            f"input {tensor.name!r} has shape {tensor.shape}; expected {expected}"
        )
    try:
        if "binary_data_size" in tensor.parameters:
            values = np.frombuffer(binary, dtype="<f4")
        else:
            values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        batch = values.reshape(tensor.shape).astype(np.float32)
    except (ValueError, TypeError):
        raise BadRequestError(
            f"input {tensor.name!r}: data does not fill shape {tensor.shape} with numbers"
        ) from None
    if not np.isfinite(batch).all():
        raise BadRequestError(f"input {tensor.name!r} holds NaN or infinite values")
    return list(batch)


def _outputs(
    request: InferRequest, probabilities: np.ndarray, labels: list[str]
) -> list[OutputTensor]:
    wanted = request.outputs or [RequestedOutput("probabilities")]
    tensors = []
    for output in wanted:
        if output.name != "probabilities":
            raise BadRequestError(f"unknown output {output.name!r}; this model has 'probabilities'")
        k = output.parameters.get("classification")
        if k is None:
            tensors.append(
                OutputTensor(
                    "probabilities",
                    "FP32",
                    list(probabilities.shape),
                    probabilities.reshape(-1).tolist(),
                )
            )
            continue
        k = min(int(k), len(labels))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        rows = [f"{p[i]:f}:{i}:{labels[i]}" for p, top in zip(probabilities, order, strict=True)
                for i in top]  # fmt: skip
        tensors.append(OutputTensor("probabilities", "BYTES", [len(probabilities), k], rows))
    return tensors


async def _infer(
    request: Request[Any, Any, Any], runtime: Runtime, name: str, version: str | None
) -> InferResponse:
    deadline = time.monotonic() + runtime.settings.deadline_s
    runtime.catalog.resolve(name, version)  # 404 / 503 before the body is read
    header, binary = _split_binary(await read_body(request, runtime.settings, deadline),
                                   request.headers.get(BINARY_HEADER))  # fmt: skip
    deployment = runtime.catalog.resolve(name, version)  # the version serving now
    classifier = deployment.classifier
    annotate(request, model=classifier.name, version=classifier.version)
    try:
        body = msgspec.json.decode(header, type=InferRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"not an inference request: {exc}") from None
    if len(body.inputs) != 1:
        raise BadRequestError("send exactly one input: 'image' (BYTES) or 'input' (FP32)")
    (tensor,) = body.inputs
    items: list[Upload | np.ndarray]
    if tensor.datatype == "BYTES":
        items = [
            Upload(f"element {i}", data) for i, data in enumerate(_bytes_elements(tensor, binary))
        ]
    elif tensor.datatype == "FP32":
        items = list(_fp32_arrays(tensor, binary, classifier.input_shape))
    else:
        raise BadRequestError(f"datatype {tensor.datatype} is not accepted; send BYTES or FP32")
    if not items:
        raise BadRequestError(f"input {tensor.name!r} is empty")
    if len(items) > runtime.settings.max_images:
        raise PayloadTooLargeError(
            f"{len(items)} images; the limit is {runtime.settings.max_images}"
        )
    outcomes, _ = await classify(runtime, deployment, items, deadline)
    annotate(request, batch_size=max(o.batch_size for o in outcomes))
    probabilities = np.stack([o.probabilities for o in outcomes])
    return InferResponse(
        model_name=classifier.name,
        model_version=str(classifier.version),
        outputs=_outputs(body, probabilities, classifier.labels),
        id=body.id,
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
