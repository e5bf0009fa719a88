"""The model card of an ONNX graph, read from the graph itself: no torch, no conversion.

An imported graph that has no torch twin (service.graph_files) still gets the card every other
version has: output shape, parameters, multiply-adds and receptive field per layer. Shapes come
from ONNX's shape inference at batch 1, parameters from the initializers a node reads, and the
receptive field is followed tensor by tensor, so branches are not compounded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper, shape_inference

from service.card import Anatomy, LayerRow, conv_output_size, local_field_note

SPATIAL = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}
# every output sees the whole image after these (a squeeze-excitation's mean too)
GLOBAL = {
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Gemm", "MatMul", "ReduceMean",
    "ReduceMax", "ReduceSum",
}  # fmt: skip
LAYERS = SPATIAL | GLOBAL | {
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "LRN", "Relu",
    "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Clip", "Softmax", "LogSoftmax", "Dropout", "Flatten", "Mish", "Gelu",
}  # fmt: skip


def _attributes(node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _weights(graph: Any) -> dict[str, Any]:
    """Initializers and Constant outputs, by tensor name, as numpy arrays; a quantized graph's
    DequantizeLinear of an initializer stands for that (integer) initializer."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
        elif node.op_type == "DequantizeLinear" and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    return found


def _shapes(model: Any) -> dict[str, list[int]]:
    """Every tensor's inferred shape at batch 1 (dimensions left unknown are 0)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    del model.graph.value_info[:]
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _spatial(node: Any, weight: Any) -> tuple[list[int], list[int], list[int], list[int]]:
    """kernel, stride, begin padding, dilation of a conv or pool node."""
    attributes = _attributes(node)
    declared = attributes.get("kernel_shape") or (weight.shape[2:] if weight is not None else [])
    kernel = [int(k) for k in declared][:2] or [1, 1]
    stride = [int(s) for s in attributes.get("strides", [1, 1])][:2]
    pads = [int(p) for p in attributes.get("pads", [0, 0, 0, 0])]
    dilation = [int(d) for d in attributes.get("dilations", [1, 1])][:2]
    return kernel, stride, pads[:2], dilation


def _formula(node: Any, weight: Any, in_shape: list[int]) -> list[int] | None:
    """floor((W - K + 2P) / S) + 1 per side, as the card shows beside the real shape."""
    attributes = _attributes(node)
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    if node.op_type not in ("Conv", "MaxPool", "AveragePool") or len(in_shape) != 4:
        return None
    if auto_pad not in (b"NOTSET", "NOTSET") or attributes.get("ceil_mode", 0):
        return None
    kernel, stride, _, dilation = _spatial(node, weight)
    pads = [int(p) for p in attributes.get("pads", [0, 0, 0, 0])]
    # uneven padding: the end side's extra counts as part of the input
    sizes = []
    for axis in range(2):
        size = in_shape[2 + axis] + pads[axis + 2] - pads[axis]
        sizes.append(conv_output_size(size, kernel[axis], stride[axis], pads[axis], dilation[axis]))
    convolution = node.op_type == "Conv" and weight is not None
    channels = int(weight.shape[0]) if convolution else in_shape[1]
    return [channels, *sizes]


LEARNED = ("float16", "float32", "float64", "int8", "uint8", "int32")  # int32: quantized biases


def _size(tensor: Any) -> int:
    """A weight's element count; 0 for what is not learned (int64 axes and shapes)."""
    return int(tensor.size) if tensor is not None and tensor.dtype.name in LEARNED else 0


def _macs(node: Any, weight: Any, out_shape: list[int]) -> int:
    if weight is None:
        return 0
    if node.op_type == "Conv" and len(out_shape) == 4:
        return int(weight.size) * out_shape[2] * out_shape[3]  # Cout * Cin/groups * kh * kw each
    if node.op_type in ("Gemm", "MatMul"):
        positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        return int(weight.size) * positions
    return 0


def graph_anatomy(path: Path, input_shape: tuple[int, int, int]) -> Anatomy:
    """The per-layer table of the graph in `path` for one (C, H, W) image."""
    model = onnx.load(str(path))
    graph = model.graph
    weights = _weights(graph)
    shapes = _shapes(model)
    full = max(input_shape[1:])
    fields: dict[str, tuple[int, int]] = {graph.input[0].name: (1, 1)}  # tensor: (rf, jump)
    rows: list[LayerRow] = []
    notes: list[str] = []
    last_spatial: int | None = None
    for index, node in enumerate(graph.node):
        seen = [fields[name] for name in node.input if name in fields]
        rf, jump = max(seen) if seen else (1, 1)
        weight = next((weights[name] for name in node.input[1:] if name in weights), None)
        kernel = stride = padding = None
        if node.op_type in SPATIAL:
            kernel, stride, padding, dilation = _spatial(node, weight)
            rf, jump = rf + (kernel[0] - 1) * dilation[0] * jump, jump * stride[0]
            last_spatial = rf
        elif node.op_type in GLOBAL:
            rf = max(rf, full)
        for name in node.output:
            fields[name] = (rf, jump)
        if node.op_type not in LAYERS:
            continue
        out = shapes.get(node.output[0], [])[1:]
        in_shape = shapes.get(node.input[0], []) if node.input else []
        formula = _formula(node, weight, in_shape)
        if formula is not None and out and formula != out:
            notes.append(f"{node.name}: formula gives {formula} but the graph produces {out}")
        counted = node.input[1:3] if node.op_type == "BatchNormalization" else node.input[1:]
        rows.append(LayerRow(
            name=node.name or f"{node.op_type.lower()}_{index}", type=node.op_type,
            kernel=kernel, stride=stride, padding=padding, output_shape=out,
            formula_shape=formula,
            params=sum(_size(weights.get(name)) for name in counted),
            macs=_macs(node, weight, shapes.get(node.output[0], [])), receptive_field=rf,
        ))  # fmt: skip
    note = local_field_note(last_spatial, list(input_shape))
    if note is not None:
        notes.append(note)
    return Anatomy(
        input_shape=list(input_shape),
        output_shape=shapes.get(graph.output[0].name, [])[1:],
        rows=rows,
        total_params=sum(row.params for row in rows),  # BatchNorm's running statistics: none
        total_macs=sum(row.macs for row in rows),
        receptive_field=last_spatial,
        warnings=notes,
    )
