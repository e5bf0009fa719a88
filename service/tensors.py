"""Open Inference Protocol tensors -> images or FP32 arrays, bounded before work is done: the
REST V2 routes' JSON bodies (parse_request), and the checks gRPC's ModelInfer shares with them
(service.grpc_v2.messages). Transport-neutral: no litestar here.

A body is read twice. First with nothing built, only skipped: where the tensor data lies,
how many inputs and outputs there are; the JSON outside the data must then fit in
MAX_META_BYTES. Then typed throughout (no `Any`, no unknown members), so a body nested deeper
than the protocol (3 + MAX_RANK levels) fails while it is decoded. Each element count is
checked against its limit before the elements are built, each number against its type and
range, and no output can be asked for twice, so nothing a client sends is amplified.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np

from service.errors import BadRequestError, PayloadTooLargeError
from service.inference import Image as Upload

BINARY_HEADER = "inference-header-content-length"
OUTPUT = "probabilities"
MAX_RANK = 8  # dimensions in a tensor's shape; with the request's own 3 levels, its JSON depth
MAX_DIM = 2**31 - 1
MAX_META_BYTES = 64 * 1024  # the JSON besides tensor data: names, shape, parameters, outputs
FP32_MAX = float(np.finfo(np.float32).max)
DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: int() also takes '٣' and ' 12 '
NESTED = re.compile(rb"\s*\[\s*\[")
T = TypeVar("T")

Scalar = str | int | float | bool | None  # the protocol's parameter values: never containers
Parameters = dict[str, Scalar]


class InputTensor(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: Annotated[list[int], msgspec.Meta(max_length=MAX_RANK)]
    datatype: str
    data: msgspec.Raw = msgspec.Raw()  # decoded by datatype once the shape has been checked
    parameters: Parameters = msgspec.field(default_factory=dict)


class RequestedOutput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: Parameters = msgspec.field(default_factory=dict)


class InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: tuple[InputTensor]  # exactly one: a longer list fails at its second element
    id: str | None = None
    parameters: Parameters = msgspec.field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None


class DataOnly(msgspec.Struct):
    """An input with everything but its data skipped."""

    data: msgspec.Raw = msgspec.Raw()


class NameOnly(msgspec.Struct):
    """A requested output with its parameters skipped."""

    name: str


class Envelope(msgspec.Struct):
    """A request with nothing built: where its data lies, and its outputs undecoded."""

    inputs: tuple[DataOnly]
    outputs: list[msgspec.Raw] | None = None


@dataclass(frozen=True)
class Limits:
    """What the serving model and the settings allow one request."""

    max_images: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    classes: int


@dataclass(frozen=True)
class ParsedRequest:
    items: list[Upload] | list[np.ndarray]  # encoded images, or (C, H, W) float32 arrays
    top_k: int | None  # the classification extension's class count, clipped; None: FP32 output
    id: str | None


def shown(value: object, limit: int = 40) -> str:
    """A client's value in an error detail, cut short: the detail must not echo a flood."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it (binary-data extension)."""
    if header_length is None:
        return body, b""
    if not DIGITS.fullmatch(header_length):
        raise BadRequestError(
            f"Inference-Header-Content-Length must be a byte count; got {shown(header_length)}"
        )
    length = int(header_length)
    if not 0 < length <= len(body):
        raise BadRequestError(
            f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes"
        )
    return body[:length], body[length:]


def decode(text: bytes, kind: type[T], where: str = "") -> T:
    """msgspec.json.decode with every failure a 400 that says where."""
    try:
        return msgspec.json.decode(text, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message = f"not an inference request: {where}{exc}"
        if "`$.inputs`" in message:
            message += "; send exactly one input: 'image' (BYTES) or 'input' (FP32)"
        if "parameters[...]" in message:
            message += "; parameter values are strings, numbers or booleans"
        raise BadRequestError(message) from None
    except RecursionError:  # skipping a value nested deeper than the interpreter allows
        raise BadRequestError(
            f"not an inference request: JSON nested deeper than {3 + MAX_RANK} levels"
        ) from None


def parse_request(body: bytes, header_length: str | None, limits: Limits) -> ParsedRequest:
    """The request's images or arrays; 400 for anything malformed, 413 past a bound.
    Pure and bounded, so a large body can be parsed off the event loop."""
    header, binary = split_binary(body, header_length)
    envelope = decode(header, Envelope)
    check_outputs(envelope.outputs or [])
    outside = len(header) - len(envelope.inputs[0].data)
    if outside > MAX_META_BYTES:
        raise PayloadTooLargeError(
            f"the inference request has {outside:,} bytes of JSON besides its tensor data; "
            f"the limit is {MAX_META_BYTES:,}"
        )
    request = decode(header, InferRequest)
    top_k = classification(request.outputs or [], limits.classes)
    (tensor,) = request.inputs
    count = element_count(tensor)
    size = binary_size(tensor, binary)
    items: list[Upload] | list[np.ndarray]
    if check_datatype(tensor) == "BYTES":
        check_image_count(tensor, count, limits)
        elements = json_bytes(tensor, count) if size is None else binary_bytes(binary, count)
        items = uploads(elements)
    else:
        items = list(fp32_batch(tensor, binary if size is not None else None, limits))
    return ParsedRequest(items, top_k, request.id)


def check_datatype(tensor: InputTensor) -> str:
    """BYTES (encoded image files) or FP32 (preprocessed arrays); 400 otherwise."""
    if tensor.datatype not in ("BYTES", "FP32"):
        raise BadRequestError(
            f"datatype {shown(tensor.datatype)} is not accepted; send BYTES or FP32"
        )
    return tensor.datatype


def check_image_count(tensor: InputTensor, count: int, limits: Limits) -> None:
    """A BYTES tensor holds one image per element: 413 past CONVSERVE_MAX_IMAGES."""
    if count > limits.max_images:
        raise PayloadTooLargeError(
            f"input {shown(tensor.name)} has shape {tensor.shape}: {count} images; "
            f"the limit is {limits.max_images}"
        )


def uploads(elements: list[bytes]) -> list[Upload]:
    """BYTES elements as images, named by their position for their errors."""
    return [Upload(f"element {i}", data) for i, data in enumerate(elements)]


def check_outputs(entries: list[msgspec.Raw]) -> None:
    """The one known output, asked for at most once (each copy would repeat the answer).
    Only the first two entries are read: a flood of copies is refused at its second."""
    check_output_names(
        [
            decode(entry, NameOnly, f"output {index}: ").name
            for index, entry in enumerate(entries[:2])
        ],
        len(entries),
    )


def check_output_names(names: list[str], total: int) -> None:
    """The first (at most two) requested output names of `total`: only OUTPUT, once."""
    for index, name in enumerate(names[:2]):
        if name != OUTPUT:
            raise BadRequestError(f"unknown output {shown(name)}; this model has {OUTPUT!r}")
        if index == 1:
            raise BadRequestError(f"output {name!r} is requested {total} times; ask for it once")


def top_rows(top_k: int, probabilities: np.ndarray, labels: list[str]) -> list[str]:
    """The classification extension: each row's top k as "probability:index:label", row-major."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [f"{p[i]:f}:{i}:{labels[i]}" for p, top in zip(probabilities, order, strict=True)
            for i in top]  # fmt: skip


def classification(outputs: list[RequestedOutput], classes: int) -> int | None:
    """The classification extension's class count: an integer >= 1, clipped to the classes."""
    k = outputs[0].parameters.get("classification") if outputs else None
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequestError(
            f"parameter 'classification' must be an integer >= 1 (classes to return); "
            f"got {shown(k)}"
        )
    return min(k, classes)


def element_count(tensor: InputTensor) -> int:
    """The elements its shape declares: 1 to MAX_RANK dimensions, each 1..MAX_DIM (so the
    product stays a number that can be printed in a detail)."""
    shape = tensor.shape
    if not 0 < len(shape) <= MAX_RANK or any(not 1 <= d <= MAX_DIM for d in shape):
        raise BadRequestError(
            f"input {shown(tensor.name)} has shape {shown(tensor.shape)}; every dimension "
            f"must be an integer from 1 to {MAX_DIM}, at most {MAX_RANK} of them"
        )
    return math.prod(tensor.shape)


def binary_size(tensor: InputTensor, binary: bytes) -> int | None:
    """`binary_data_size` when the data follows the header; it must cover exactly that data."""
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise BadRequestError(
                f"{len(binary)} bytes follow the JSON header, but input {shown(tensor.name)} "
                "has no 'binary_data_size' parameter"
            )
        if not tensor.data:
            raise BadRequestError(f"input {shown(tensor.name)} has no data")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise BadRequestError(
            f"input {shown(tensor.name)}: 'binary_data_size' {shown(size)} does not match the "
            f"{len(binary)} bytes after the JSON header"
        )
    if tensor.data:
        raise BadRequestError(
            f"input {shown(tensor.name)} has both 'data' and binary data; send one"
        )
    return size


def binary_bytes(binary: bytes, count: int) -> list[bytes]:
    """Length-prefixed elements, walked no further than one past the declared count."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(binary):
        if len(elements) == count:
            raise BadRequestError(
                f"the binary data holds more than the {count} elements its shape declares"
            )
        if offset + 4 > len(binary):
            raise BadRequestError("truncated BYTES element in the binary data")
        (size,) = struct.unpack_from("<I", binary, offset)
        end = offset + 4 + size
        if end > len(binary):
            raise BadRequestError(
                f"BYTES element {len(elements)} declares {size} bytes; fewer follow"
            )
        elements.append(binary[offset + 4 : end])
        offset = end
    if len(elements) != count:
        raise BadRequestError(
            f"the binary data holds {len(elements)} elements; its shape declares {count}"
        )
    return elements


def json_bytes(tensor: InputTensor, count: int) -> list[bytes]:
    """Base64 strings, counted before one is built: each string brings two quotes, and a
    backslash can escape at most one of them."""
    raw = bytes(tensor.data)
    at_least = (raw.count(b'"') - raw.count(b"\\")) // 2
    if at_least > count:
        raise BadRequestError(
            f"input {shown(tensor.name)} holds at least {at_least} elements; "
            f"its shape {tensor.shape} declares {count}"
        )
    strings = decode_data(tensor, raw, str)
    try:
        return [base64.b64decode(item, validate=True) for item in strings]
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"input {shown(tensor.name)}: BYTES elements must be base64-encoded image files"
        ) from None


def fp32_batch(tensor: InputTensor, binary: bytes | None, limits: Limits) -> np.ndarray:
    """(N, C, H, W) float32, shape checked before the data is read, values finite."""
    expected = [-1, *limits.input_shape]
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != limits.input_shape:
        raise BadRequestError(
            f"input {shown(tensor.name)} has shape {shown(tensor.shape)}; expected {expected}"
        )
    if tensor.shape[0] > limits.max_images:
        raise PayloadTooLargeError(
            f"input {shown(tensor.name)} holds {tensor.shape[0]} images; "
            f"the limit is {limits.max_images}"
        )
    count = math.prod(tensor.shape)
    if binary is not None:
        if len(binary) != 4 * count:
            raise BadRequestError(
                f"input {shown(tensor.name)}: {len(binary)} bytes of FP32 data; "
                f"shape {tensor.shape} needs {4 * count}"
            )
        batch = np.frombuffer(binary, dtype="<f4").astype(np.float32)
        if not np.isfinite(batch).all():
            raise BadRequestError(f"input {shown(tensor.name)} holds NaN or infinite values")
        return batch.reshape(tensor.shape)
    raw = bytes(tensor.data)
    if not NESTED.match(raw) and raw.count(b",") >= count:  # flat: one comma between each
        raise BadRequestError(
            f"input {shown(tensor.name)} holds more than the {count} values "
            f"its shape {tensor.shape} declares"
        )
    values = np.array(decode_data(tensor, raw, float), dtype=np.float64)
    if (np.abs(values) > FP32_MAX).any():  # JSON has no NaN; 1e39 is finite in float64 only
        raise BadRequestError(f"input {shown(tensor.name)} holds values beyond the FP32 range")
    return values.astype(np.float32).reshape(tensor.shape)


def decode_data(tensor: InputTensor, raw: bytes, element: type) -> list[Any]:
    """`data` flat, or nested exactly as its shape (the protocol allows both), flattened;
    as many elements as the shape declares."""
    nested = NESTED.match(raw) is not None and len(tensor.shape) > 1
    kind: Any = element
    for _ in tensor.shape if nested else [None]:
        kind = list[kind]
    try:
        data = msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        what = "strings" if element is str else "numbers"
        raise BadRequestError(
            f"input {shown(tensor.name)}: 'data' must be {what}, flat or nested as its "
            f"shape {tensor.shape}: {exc}"
        ) from None
    flat = flatten(data, tensor.shape, tensor.name) if nested else data
    if len(flat) != math.prod(tensor.shape):
        raise BadRequestError(
            f"input {shown(tensor.name)} holds {len(flat)} values; "
            f"its shape {tensor.shape} declares {math.prod(tensor.shape)}"
        )
    return flat


def flatten(data: list[Any], shape: list[int], name: str) -> list[Any]:
    """Row-major elements of nested lists that must match the shape at every level."""
    if len(data) != shape[0]:
        raise BadRequestError(
            f"input {shown(name)}: nested 'data' does not match its shape {shape}"
        )
    if len(shape) == 1:
        return data
    return [item for row in data for item in flatten(row, shape[1:], name)]
