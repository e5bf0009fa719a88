"""ModelInferRequest -> images or FP32 arrays, and answers -> ModelInferResponse.

The checks are the REST V2 routes' (service.tensors): one input, BYTES or FP32, the shape
bounded before the data is read, FP32 of the model's (N, C, H, W) and finite, one known output
with the classification extension. The data comes in `raw_input_contents` (what
tritonclient sends) or in the typed `contents`; answers go out raw, as Triton sends them.
"""

from __future__ import annotations

import struct

import numpy as np

from service.errors import BadRequestError
from service.grpc_v2 import inference_pb2 as pb
from service.tensors import (
    OUTPUT,
    InputTensor,
    Limits,
    ParsedRequest,
    RequestedOutput,
    Scalar,
    binary_bytes,
    check_datatype,
    check_image_count,
    check_output_names,
    classification,
    element_count,
    fp32_batch,
    shown,
    top_rows,
    uploads,
)

ONE_INPUT = "send exactly one input: 'image' (BYTES) or 'input' (FP32)"


def parameter(value: pb.InferParameter) -> Scalar:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def parse_infer(request: pb.ModelInferRequest, limits: Limits) -> ParsedRequest:
    """The request's images or arrays; 400 (413 past a bound) for anything malformed."""
    if len(request.inputs) != 1:
        raise BadRequestError(f"the request has {len(request.inputs)} inputs; {ONE_INPUT}")
    names = [output.name for output in request.outputs[:2]]
    check_output_names(names, len(request.outputs))
    wanted = [
        RequestedOutput(o.name, {k: parameter(v) for k, v in o.parameters.items()})
        for o in request.outputs[:1]
    ]
    top_k = classification(wanted, limits.classes)
    proto = request.inputs[0]
    tensor = InputTensor(proto.name, list(proto.shape), proto.datatype)
    count = element_count(tensor)
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise BadRequestError(f"{len(raw)} raw_input_contents for one input; send one")
    if raw and proto.HasField("contents"):
        raise BadRequestError(
            f"input {shown(tensor.name)} has both 'contents' and raw_input_contents; send one"
        )
    if check_datatype(tensor) == "BYTES":
        check_image_count(tensor, count, limits)
        elements = binary_bytes(raw[0], count) if raw else list(proto.contents.bytes_contents)
        if len(elements) != count:
            raise BadRequestError(
                f"input {shown(tensor.name)} holds {len(elements)} elements; "
                f"its shape {tensor.shape} declares {count}"
            )
        return ParsedRequest(uploads(elements), top_k, request.id or None)
    if raw:
        data = raw[0]
    else:
        values = proto.contents.fp32_contents
        if len(values) != count:
            raise BadRequestError(
                f"input {shown(tensor.name)} holds {len(values)} values; "
                f"its shape {tensor.shape} declares {count}"
            )
        data = np.asarray(values, dtype="<f4").tobytes()
    return ParsedRequest(list(fp32_batch(tensor, data, limits)), top_k, request.id or None)


def infer_response(
    name: str,
    version: int,
    request_id: str | None,
    top_k: int | None,
    probabilities: np.ndarray,
    labels: list[str],
) -> pb.ModelInferResponse:
    """`probabilities` FP32 (N, classes), or its top k as BYTES "probability:index:label"."""
    response = pb.ModelInferResponse(
        model_name=name, model_version=str(version), id=request_id or ""
    )
    output = response.outputs.add(name=OUTPUT)
    if top_k is None:
        output.datatype = "FP32"
        output.shape.extend(probabilities.shape)
        response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
    else:
        output.datatype = "BYTES"
        output.shape.extend([len(probabilities), top_k])
        rows = [row.encode() for row in top_rows(top_k, probabilities, labels)]
        packed = b"".join(struct.pack("<I", len(row)) + row for row in rows)
        response.raw_output_contents.append(packed)
    return response
