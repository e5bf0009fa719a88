"""`convserve import FILE`: an ONNX, TorchScript or torch.export file into the store.

Every format becomes one ONNX graph that takes NCHW float32 images with any batch size and gives
raw logits or log-probabilities (service.graphs serves it). Each check refuses with what to do:
- a dry run on a dummy batch, in ONNX Runtime;
- the output width against the label count;
- a graph ending in softmax gets a log appended (so convserve's one softmax gives back the same
  probabilities), a log-softmax is recorded as such: nothing is softmaxed twice;
- a batch dimension fixed at 1 is rewritten to dynamic and checked image by image; where the
  graph cannot batch, its images run one at a time (`batch: loop`);
- NHWC inputs are detected and get a transpose in front;
- the torch twin (onnx2torch) must match ONNX Runtime to 1e-4.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript.optimizer
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import nn

from service.anatomy import trace
from service.engines import TOLERANCE
from service.errors import ArchitectureError, UnreadableFileError
from service.graph_files import GRAPH_ARCHITECTURE
from service.graphs import ONNX2TORCH_OPSET, Looped, convert_graph
from service.heatmaps import heatmap_layers
from service.registry import Shape
from service.spec import InputSpec, ModelSpec, TrainingMetrics, now_iso, sha256_file
from service.store import IMAGENET_MEAN, ModelStore, check_input

FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "torch_export"}
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SHAPE: Shape = (3, 224, 224)
MAX_SIDE = 4096  # a larger input is a mistake or a trap: every request would allocate it
BATCH = "N"
SCOPE = "convserve.name"  # node metadata: its name before the optimizer ran


@dataclass(frozen=True)
class FileOptions:
    """What `convserve import FILE` was told; None: found from the file or the default."""

    labels: Path | None = None
    input_shape: Shape | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: str | None = None  # "stretch" or "center_crop:SIZE"
    channel_order: str | None = None
    layout: str | None = None  # "NCHW" or "NHWC"
    quantize: str | None = None  # "int8": with calibrate (service.quantize)
    calibrate: Path | None = None
    held_out: Path | None = None


@dataclass
class Normalized:
    model: Any  # onnx.ModelProto, NCHW in, logits or log-probabilities out
    shape: Shape
    facts: dict[str, Any]
    notes: list[str]


def file_format(path: Path) -> str | None:
    """'onnx', 'torchscript' or 'torch_export' for a model file's suffix; None otherwise."""
    return FORMATS.get(path.suffix.lower())


def read_labels(path: Path) -> list[str]:
    """One label per line, or a JSON list, or a JSON object from class index to label."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, list):
        return [str(item) for item in data]
    if isinstance(data, dict):
        try:
            indexed = sorted((int(key), str(value)) for key, value in data.items())
        except ValueError:
            raise ValueError(
                f"{path}: a JSON object of labels needs class indices as keys"
            ) from None
        if [index for index, _ in indexed] != list(range(len(indexed))):
            raise ValueError(f"{path}: label indices must run 0..{len(indexed) - 1} without gaps")
        return [label for _, label in indexed]
    raise ValueError(f"{path}: expected one label per line, a JSON list or a JSON object")


def _quiet() -> contextlib.ExitStack:
    """The exporters narrate and warn about deprecations a user cannot act on."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _runs(module: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.inference_mode():
            module(torch.zeros(shape))
    except Exception:  # any refusal of the input means: not this layout
        return False
    return True


def _from_torchscript(path: Path, options: FileOptions) -> Any:
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu").eval()  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise UnreadableFileError(
            f"{path} is not a TorchScript archive ({str(exc).splitlines()[0]}); for a state "
            "dict, use `convserve import ARCH --weights FILE`"
        ) from None
    c, h, w = options.input_shape or DEFAULT_SHAPE
    layouts = [options.layout] if options.layout else ["NCHW", "NHWC"]
    for layout in layouts:
        example = (1, c, h, w) if layout == "NCHW" else (1, h, w, c)
        if _runs(module, example):
            break
    else:
        raise ValueError(
            f"{path.name} does not run on a {c}x{h}x{w} image in {' or '.join(layouts)} layout: "
            "give the input it takes with --input CxHxW (and --layout)"
        )
    with tempfile.TemporaryDirectory(prefix="convserve-import-") as folder, _quiet():
        target = Path(folder) / "graph.onnx"
        torch.onnx.export(
            module, (torch.zeros(example),), target, dynamo=False, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: BATCH}, "output": {0: BATCH}},
            opset_version=ONNX2TORCH_OPSET,
        )  # fmt: skip
        return onnx.load(str(target))


def _from_torch_export(path: Path) -> Any:
    try:
        with _quiet():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise UnreadableFileError(
            f"{path} is not a torch.export archive ({str(exc).splitlines()[0]}): save it with "
            "torch.export.save"
        ) from None
    with _quiet():
        exported = torch.onnx.export(program, dynamo=True, input_names=["input"])
    assert exported is not None
    return exported.model_proto


def _from_onnx(path: Path) -> Any:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UnreadableFileError(f"{path} is not a valid ONNX model: {exc}") from None
    return model


def load_graph(path: Path, options: FileOptions) -> Any:
    """Any supported file as an ONNX ModelProto at an opset onnx2torch converts."""
    fmt = file_format(path)
    if fmt == "onnx":
        model = _from_onnx(path)
    elif fmt == "torchscript":
        model = _from_torchscript(path, options)
    elif fmt == "torch_export":
        model = _from_torch_export(path)
    else:
        raise ValueError(
            f"{path.name}: convserve imports .onnx, TorchScript (.pt, .ts) and torch.export "
            "(.pt2) files; for a state dict use `convserve import ARCH --weights FILE`"
        )
    _name_layers(model.graph)  # before conversion and optimizing: they drop torch's metadata
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > ONNX2TORCH_OPSET:
        with contextlib.suppress(Exception):  # kept as it is when it does not convert down
            model = version_converter.convert_version(model, ONNX2TORCH_OPSET)
            _drop_default_noop(model.graph)
    for node in model.graph.node:  # the optimizer renames nodes, but keeps their metadata
        entry = node.metadata_props.add()
        entry.key, entry.value = SCOPE, node.name
    with contextlib.suppress(Exception):  # folds constants and the exporters' Identity nodes
        model = onnxscript.optimizer.optimize(model)
    for node in model.graph.node:
        node.name = {e.key: e.value for e in node.metadata_props}.get(SCOPE, node.name)
    return model


def _drop_default_noop(graph: Any) -> None:
    """onnx's converter to opset 17 leaves Reduce*'s opset-18 attribute behind; at its default
    (0) it means what opset 17 does without it."""
    for node in graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            for attribute in list(node.attribute):
                if attribute.name == "noop_with_empty_axes" and attribute.i == 0:
                    node.attribute.remove(attribute)


def _scope(node: Any) -> str:
    """The module a node came from, by TorchScript's node names or torch.export's name scopes
    (a convolution its batch norm was folded into is named by its block); "" when unknown."""
    if node.name.startswith("/"):  # TorchScript's exporter: /features/0/0/Conv
        return ".".join(node.name.strip("/").split("/")[:-1])
    props = {entry.key: entry.value for entry in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))[1:-1]
        classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))[1:-1]
    except (ValueError, SyntaxError):
        return ""
    if node.op_type == "Conv":
        convs = [s for s, c in zip(scopes, classes, strict=False) if "conv" in c.lower()]
        scopes = convs or scopes
    return str(scopes[-1]) if scopes else ""


def _name_layers(graph: Any) -> None:
    """Name nodes after the modules they came from, so heatmap layers and the card read
    features_0 rather than node_Conv_506 (onnx2torch names its modules after the nodes)."""
    taken: set[str] = set()
    for node in graph.node:
        scope = _scope(node).replace(".", "_")
        if not scope:
            taken.add(node.name)
            continue
        name, count = scope, 1
        while name in taken:
            count += 1
            name = f"{scope}_{node.op_type.lower()}" if count == 2 else f"{scope}_{count}"
        node.name = name
        taken.add(name)


def _constant(graph: Any, name: str) -> Any | None:
    """The tensor behind `name` when it is an initializer or a Constant node's value."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return tensor
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return attribute.t
    return None


def _reshapes(graph: Any) -> list[tuple[Any, Any]]:
    """Reshape nodes whose target shape is a constant, with that constant."""
    found = []
    for node in graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1:
            tensor = _constant(graph, node.input[1])
            if tensor is not None:
                found.append((node, tensor))
    return found


def _drop_allowzero(graph: Any) -> None:
    """allowzero=1 changes nothing where the shape holds no 0, and onnx2torch refuses it."""
    for node, tensor in _reshapes(graph):
        if 0 in numpy_helper.to_array(tensor).tolist():
            continue
        for attribute in list(node.attribute):
            if attribute.name == "allowzero":
                node.attribute.remove(attribute)


def _dims(value: Any) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _set_batch(value: Any) -> None:
    dim = value.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = BATCH


def _dynamic_batch(model: Any) -> Any:
    """A copy whose batch dimension is free: input and output say N, and constant reshape
    targets that fixed it at 1 copy it from their input instead (ONNX's 0)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    _set_batch(graph.input[0])
    _set_batch(graph.output[0])
    del graph.value_info[:]  # shapes inferred for batch 1 no longer hold
    for node, tensor in _reshapes(graph):
        target = numpy_helper.to_array(tensor).copy()
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if target.size and target[0] == 1 and not allowzero:
            target[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))
    return model


def _to_nchw(model: Any, shape: Shape) -> None:
    """Put a transpose in front: the graph then takes NCHW like every other model."""
    graph = model.graph
    original = graph.input[0]
    c, h, w = shape
    batch = _dims(original)[0]
    image = helper.make_tensor_value_info(
        "image", original.type.tensor_type.elem_type, [batch or BATCH, c, h, w]
    )
    node = helper.make_node("Transpose", ["image"], [original.name], perm=[0, 2, 3, 1])
    graph.node.insert(0, node)
    graph.input.remove(original)
    graph.input.insert(0, image)


def _append_log(model: Any) -> None:
    """Probabilities out -> log-probabilities out: softmax of log p is p again."""
    graph = model.graph
    output = graph.output[0]
    floor = numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "convserve_floor")
    graph.initializer.append(floor)
    graph.node.extend([
        helper.make_node("Max", [output.name, floor.name], ["convserve_floored"]),
        helper.make_node("Log", ["convserve_floored"], ["log_probabilities"]),
    ])  # fmt: skip
    graph.output.remove(output)
    graph.output.insert(
        0, helper.make_tensor_value_info("log_probabilities", TensorProto.FLOAT, None)
    )


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(model: Any, batch: np.ndarray) -> np.ndarray:
    session = _session(model)
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: batch})[0]
    return out


def _one_by_one(model: Any, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([_run(model, batch[i : i + 1]) for i in range(len(batch))])


def _probe(shape: Shape, layout: str, count: int = 3) -> np.ndarray:
    c, h, w = shape
    dims = (count, c, h, w) if layout == "NCHW" else (count, h, w, c)
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def _layout_and_shape(model: Any, options: FileOptions) -> tuple[str, Shape]:
    """The input layout (given, or read from the graph's declared shape) and CxHxW."""
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise ValueError(
            f"the graph takes {len(inputs)} inputs; convserve feeds one image batch (N, C, H, W)"
        )
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise ValueError(f"the graph's input has {len(dims)} dimensions; an image batch has 4")
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("the graph's input is not float32: convserve feeds float32 images")
    layout = options.layout
    if layout is None:
        layout = "NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW"
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    declared = (c, h, w)
    given = options.input_shape
    if given is not None and any(
        d is not None and d != g for d, g in zip(declared, given, strict=True)
    ):
        shown = "x".join("?" if d is None else str(d) for d in declared)
        raise ValueError(
            f"the graph takes {shown} images ({layout}) but --input says "
            f"{'x'.join(map(str, given))}: give --input {shown.replace('?', 'H')} or the right "
            "--layout"
        )
    fallback = given or DEFAULT_SHAPE
    shape = (c or fallback[0], h or fallback[1], w or fallback[2])
    if max(shape[1:]) > MAX_SIDE:
        raise ValueError(
            f"the graph takes {shape[1]}x{shape[2]} images; convserve serves models whose input "
            f"is at most {MAX_SIDE} pixels a side"
        )
    if shape[0] not in (1, 3):
        raise ValueError(
            f"the graph's images have {shape[0]} channels; convserve feeds 1 (grey) or 3 (colour)"
            + ("" if options.layout else ": if it is NHWC, say --layout NHWC")
        )
    return layout, shape


def normalize(model: Any, options: FileOptions) -> Normalized:
    """The checks and rewrites of the module docstring; ValueError saying what to do."""
    _drop_allowzero(model.graph)
    layout, shape = _layout_and_shape(model, options)
    notes: list[str] = []
    batch_dim = _dims(model.graph.input[0])[0]
    probe = _probe(shape, layout)
    try:
        singles = _one_by_one(model, probe)
    except Exception as exc:
        shown = "x".join(map(str, shape))
        raise ValueError(f"dry run on a dummy {shown} image failed: {exc}") from None
    batch = "dynamic"
    if batch_dim is None:
        candidate = model
    else:
        candidate = _dynamic_batch(model)
        batch = "rewritten"
    try:
        together = _run(candidate, probe)
        agrees = together.shape == singles.shape and np.allclose(together, singles, atol=TOLERANCE)
    except Exception:
        agrees = False
    if agrees:
        model = candidate
        if batch == "rewritten":
            notes.append(f"the batch dimension was fixed at {batch_dim}: rewritten to dynamic")
    elif batch_dim is None:
        raise ValueError("the graph gives different answers for an image alone and in a batch")
    else:
        batch = "loop"
        notes.append(
            f"the batch dimension is fixed at {batch_dim} and the graph cannot be rewritten to "
            "batch: each image of a batch runs on its own (slower; re-export with a dynamic batch)"
        )
    if len(singles.shape) != 2:
        raise ValueError(
            f"the graph's output has shape {list(singles.shape)}; convserve needs (N, classes)"
        )
    output = _output_kind(singles)
    if output == "softmax":
        _append_log(model)
        notes.append("the graph ends in softmax: its probabilities are served as they are")
    elif output == "log_softmax":
        notes.append("the graph ends in log-softmax: its probabilities are served as they are")
    if layout == "NHWC":
        _to_nchw(model, shape)
        notes.append("the graph takes NHWC images: a transpose was put in front")
    facts = {"layout": layout, "batch": batch, "output": output, "classes": int(singles.shape[1])}
    return Normalized(model, shape, facts, notes)


def _output_kind(outputs: np.ndarray) -> str:
    ones = np.ones(len(outputs))
    if (outputs >= 0).all() and np.allclose(outputs.sum(axis=1), ones, atol=1e-4):
        return "softmax"
    if np.allclose(np.exp(outputs.astype(np.float64)).sum(axis=1), ones, atol=1e-4):
        return "log_softmax"
    return "logits"


def torch_twin(normalized: Normalized) -> nn.Module:
    """The graph as a torch module, checked against ONNX Runtime to 1e-4 on a dummy batch."""
    module = convert_graph(normalized.model)
    if normalized.facts["batch"] == "loop":
        module = Looped(module)
    probe = _probe(normalized.shape, "NCHW")
    expected = _run(normalized.model, probe[:1]) if normalized.facts["batch"] == "loop" else None
    with torch.inference_mode():
        if expected is None:
            expected = _run(normalized.model, probe)
            got = module(torch.from_numpy(probe)).numpy()
        else:
            got = module(torch.from_numpy(probe[:1])).numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, atol=TOLERANCE):
        worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        raise ArchitectureError(
            f"onnx2torch converts this graph but its answers differ from ONNX Runtime's by "
            f"{worst:.2g} (more than {TOLERANCE:g})"
        )
    return module


def preprocessing(shape: Shape, options: FileOptions) -> InputSpec:
    """torchvision's ImageNet preprocessing for 3x224x224 unless told otherwise; elsewhere
    the picture stretched to size, scaled to 0..1 (mean 0, std 1) unless --mean/--std say."""
    c, h, w = shape
    imagenet = shape == DEFAULT_SHAPE
    mean = options.mean or (list(IMAGENET_MEAN) if imagenet else [0.0] * c)
    std = options.std or (list(IMAGENET_STD) if imagenet else [1.0] * c)
    for label, values in (("--mean", mean), ("--std", std)):
        if len(values) != c:
            raise ValueError(
                f"{label} has {len(values)} values; the graph's images have {c} channels"
            )
    resize, size = (
        ("center_crop", 256) if imagenet and options.resize is None else ("stretch", None)
    )
    if options.resize is not None:
        resize, _, rest = options.resize.partition(":")
        size = int(rest) if rest.isdigit() else None
        if rest and size is None:
            raise ValueError(f"--resize center_crop:SIZE takes a whole number, not {rest!r}")
        if resize not in ("stretch", "center_crop") or (resize == "center_crop") != (
            size is not None
        ):
            raise ValueError(f"--resize takes stretch or center_crop:SIZE, not {options.resize!r}")
        if size is not None and size < max(h, w):
            raise ValueError(f"center_crop:{size} is smaller than the {h}x{w} crop")
    order = options.channel_order or ("L" if c == 1 else "RGB")
    if (order == "L") != (c == 1):
        raise ValueError(f"--channel-order {order} does not fit images of {c} channels")
    spec = InputSpec(
        channels=c, height=h, width=w, mean=[float(v) for v in mean], std=[float(v) for v in std],
        resize=resize, resize_size=size, channel_order=order,  # type: ignore[arg-type]
    )  # fmt: skip
    check_input(spec)  # what loading would refuse is refused before anything is written
    return spec


def _initializers(model: Any) -> dict[str, torch.Tensor]:
    """A graph's own weights, as the version's weights.safetensors when it has no twin."""
    return {
        tensor.name: torch.from_numpy(numpy_helper.to_array(tensor).copy())
        for tensor in model.graph.initializer
    }


def _default_layer(module: nn.Module, shape: Shape) -> str:
    with torch.inference_mode():
        layers = heatmap_layers(trace(module, torch.zeros((1, *shape))))
    convs = [name for name, point in layers.items() if point.kind == "conv"]
    if not convs:
        raise ValueError("the graph has no convolution a heatmap can be read at")
    return convs[-1]


def import_file(
    store: ModelStore, path: Path, name: str, options: FileOptions
) -> tuple[int, list[str]]:
    """Write `path` as the next version of `name`; the version and what was done to it."""
    fmt = file_format(path)
    normalized = normalize(load_graph(path, options), options)
    classes = normalized.facts["classes"]
    labels = (
        read_labels(options.labels) if options.labels else [f"class {i}" for i in range(classes)]
    )
    if len(labels) != classes:
        raise ValueError(
            f"the graph gives {classes} outputs per image but {options.labels} lists "
            f"{len(labels)} labels: give one label per output, in index order"
        )
    spec_input = preprocessing(normalized.shape, options)
    quantization = None
    if options.quantize is not None and options.calibrate is not None:
        from service.quantize import quantize_int8

        batch = 1 if normalized.facts["batch"] == "loop" else 8
        quantized = quantize_int8(
            normalized.model, spec_input, options.calibrate, options.held_out, batch
        )
        normalized.model, quantization = quantized.model, quantized.facts
        normalized.notes.extend(quantized.notes)
    graph = normalized.model.SerializeToString()
    arguments = {
        "format": fmt, "source": path.name, "source_sha256": sha256_file(path),
        "graph_sha256": hashlib.sha256(graph).hexdigest(), **normalized.facts,
    }  # fmt: skip
    weights: nn.Module | dict[str, torch.Tensor] = {}
    layer, unavailable = "", None
    if quantization is not None:
        arguments["quantization"] = quantization
        unavailable = (
            "an INT8 graph: heatmaps are read from the float network (import the file without "
            "--quantize for them)"
        )
    else:
        try:
            weights = torch_twin(normalized)
            layer = _default_layer(weights, normalized.shape)
        except ArchitectureError as exc:
            unavailable = str(exc)
    if unavailable is not None:  # ONNX Runtime alone serves it (service.graph_files)
        weights = _initializers(normalized.model)
        arguments["heatmaps_unavailable"] = unavailable
        normalized.notes.append(
            f"{unavailable}: ONNX Runtime serves it; heatmaps and layer maps are unavailable"
        )
    spec = ModelSpec(
        architecture=GRAPH_ARCHITECTURE,
        arguments=arguments,
        input=spec_input,
        labels=labels,
        heatmap_layer=layer,
        metrics=TrainingMetrics(dataset=f"{path.name}: accuracy not measured here"),
        sha256="",
        created=now_iso(),
        description=f"{fmt} file {path.name}{', INT8' if quantization else ''}, via "
        "`convserve import`",
        engine="torch" if normalized.facts["batch"] == "loop" else None,
    )
    return store.write(name, weights, spec, graph=graph), normalized.notes
