"""What /schema documents beyond Litestar's inference: raw image bodies, the V2 request body,
and every problem+json status a route can answer (schemathesis holds us to it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)

from service.problems import PROBLEM_TYPE, Problem
from service.tensors import MAX_DIM, MAX_RANK

BINARY = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """problem+json responses for the given statuses."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description="RFC 9457 problem details",
            media_type=PROBLEM_TYPE,
            generate_examples=False,
        )
        for status in statuses
    }


def png_response(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=bytes,
        description=description,
        media_type="image/png",
        generate_examples=False,
    )


@dataclass
class ImageUploadOperation(Operation):
    """POST bodies of the predict routes: one raw image, or multipart `file` parts."""

    def __post_init__(self) -> None:
        files = Schema(
            type=OpenAPIType.OBJECT,
            properties={"file": Schema(type=OpenAPIType.ARRAY, items=BINARY)},
            required=["file"],
        )
        self.request_body = RequestBody(
            required=False,  # none when `image=<id>` names a kept image
            description=(
                "one image (any format Pillow reads), or several as multipart `file` parts; "
                "no body with `image=<id>`"
            ),
            content={
                "image/*": OpenAPIMediaType(schema=BINARY),
                "application/octet-stream": OpenAPIMediaType(schema=BINARY),
                "multipart/form-data": OpenAPIMediaType(schema=files),
            },
        )


def _tensor_schema(required: list[str], properties: dict[str, Any]) -> Schema:
    return Schema(
        type=OpenAPIType.OBJECT,
        required=required,
        properties=properties,
        additional_properties=False,  # unknown members are refused
    )


@dataclass
class InferOperation(Operation):
    """The Open Inference Protocol request: JSON, optionally followed by binary tensor data."""

    def __post_init__(self) -> None:
        string = Schema(type=OpenAPIType.STRING)
        scalar = [OpenAPIType.STRING, OpenAPIType.NUMBER, OpenAPIType.BOOLEAN, OpenAPIType.NULL]
        parameters = Schema(
            type=OpenAPIType.OBJECT, additional_properties=Schema(type=scalar)
        )  # service.tensors: values are never containers
        dimension = Schema(type=OpenAPIType.INTEGER, minimum=1, maximum=MAX_DIM)
        tensor = _tensor_schema(
            ["name", "shape", "datatype"],
            {
                "name": string,
                "shape": Schema(
                    type=OpenAPIType.ARRAY, items=dimension, min_items=1, max_items=MAX_RANK
                ),
                "datatype": Schema(type=OpenAPIType.STRING, enum=["BYTES", "FP32"]),
                "data": Schema(type=OpenAPIType.ARRAY, items=Schema()),
                "parameters": parameters,
            },
        )
        request = _tensor_schema(
            ["inputs"],
            {
                "id": string,
                "parameters": parameters,
                "inputs": Schema(type=OpenAPIType.ARRAY, items=tensor, min_items=1, max_items=1),
                "outputs": Schema(
                    type=OpenAPIType.ARRAY,
                    items=_tensor_schema(["name"], {"name": string, "parameters": parameters}),
                ),
            },
        )
        self.request_body = RequestBody(
            required=True,
            description="KServe V2 inference request (binary tensor data extension accepted)",
            content={
                "application/json": OpenAPIMediaType(schema=request),
                "application/octet-stream": OpenAPIMediaType(schema=BINARY),
            },
        )
