"""An imported version's graph on disk, and serving it without torch when it has no twin.

`convserve import FILE` (service.import_file) stores one normalized ONNX graph per version. Most
graphs also get a torch twin (service.graphs), which Grad-CAM and the layer maps hook into.
Where onnx2torch has no converter for an op (GlobalMaxPool, the QuantizeLinear of an INT8
graph), or its twin differs from ONNX Runtime by more than 1e-4, the version still serves:
model.json's `arguments.heatmaps_unavailable` says why, weights.safetensors holds the graph's
own initializers (the store's contract: safetensors plus its hash), ONNX Runtime runs it, the
card is read from the graph (service.graph_card), and a heatmap request gets a 422 saying why.
No torch here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from service.classifier import Classifier
from service.engines import (
    ONNX_FILE,
    TOLERANCE,
    Engine,
    OnnxEngine,
    OpenVinoEngine,
    check_agreement,
)
from service.errors import ArchitectureError, HeatmapsUnavailableError, ModelLoadError
from service.spec import SPEC_FILE, ModelSpec, read_spec, sha256_file
from service.store import read_checked

log = logging.getLogger("convserve.catalog")
GRAPH_ARCHITECTURE = "graph"


def applies_softmax(arguments: dict[str, Any]) -> bool:
    """Whether an imported graph ends in (log-)softmax: its outputs are log-probabilities,
    which convserve's own softmax turns back into the same probabilities."""
    return str(arguments.get("output", "logits")) != "logits"


def heatmaps_unavailable(spec: ModelSpec) -> str | None:
    """Why a version has no heatmaps (an imported graph without a torch twin); None if it has."""
    if spec.architecture != GRAPH_ARCHITECTURE:
        return None
    reason = spec.arguments.get("heatmaps_unavailable")
    return str(reason) if reason else None


def verified_graph(folder: Path, arguments: dict[str, Any]) -> Path:
    """The version's stored graph, after checking it is the one model.json records."""
    path = folder / ONNX_FILE
    if not path.is_file():
        raise ArchitectureError(f"an imported version needs its graph {ONNX_FILE}: it is missing")
    recorded = str(arguments.get("graph_sha256", ""))
    digest = sha256_file(path)
    if digest != recorded:
        raise ArchitectureError(
            f"{ONNX_FILE} has sha256 {digest[:12]}... but model.json records "
            f"{recorded[:12]}...: the file was changed or corrupted"
        )
    return path


class OneByOne:
    """An engine whose graph takes one image at a time, run once per image of a batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self.engine.logits(batch[i : i + 1]) for i in range(len(batch))])


def _openvino(reference: Engine, path: Path, threads: int | None,
              shape: tuple[int, int, int]) -> Engine:  # fmt: skip
    """OpenVINO where it agrees with ONNX Runtime (torch cannot check it here)."""
    engine = OpenVinoEngine(path, threads)
    difference = check_agreement(engine, reference, shape)
    if difference <= TOLERANCE:
        return engine
    log.warning("%s: OpenVINO and ONNX Runtime differ by %.2g; ONNX Runtime serves it",
                path, difference)  # fmt: skip
    return reference


def _no_network(name: str, version: int, reason: str) -> Any:
    def build() -> Any:
        raise HeatmapsUnavailableError(f"model {name} v{version} has no heatmaps: {reason}")

    return build


def load_graph_only(
    folder: Path, name: str, version: int, threads: int | None, policy: str = "auto"
) -> Classifier | None:
    """The version on ONNX Runtime's CPU provider (OpenVINO's where the policy names it and it
    agrees with ONNX Runtime to 1e-4; torch cannot run it) when it is a graph without a torch
    twin; None otherwise. ModelLoadError when its files are wrong or its graph does not give
    what model.json says."""
    from service.graph_card import graph_anatomy  # onnx: only for such graphs

    try:  # model.json alone says which versions these are: no weights hashed for the others
        if heatmaps_unavailable(read_spec(folder / SPEC_FILE)) is None:
            return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None  # the loader's own checks say what is wrong with it
    spec, warnings = read_checked(folder, name, version)
    reason = heatmaps_unavailable(spec)
    if reason is None:  # model.json was replaced meanwhile: the full load reads it again
        return None
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    try:
        path = verified_graph(folder, spec.arguments)
        anatomy = graph_anatomy(path, shape)
        engine: Engine = OnnxEngine(path, threads)
        if (spec.engine or policy) == OpenVinoEngine.name:
            engine = _openvino(engine, path, threads, shape)
        if spec.arguments.get("batch") == "loop":
            engine = OneByOne(engine)
        out = engine.logits(np.zeros((2, *shape), dtype=np.float32))
    except Exception as exc:  # a graph ONNX Runtime refuses fails in many ways
        raise ModelLoadError(name, version, f"{ONNX_FILE}: {exc}") from None
    if out.shape != (2, len(spec.labels)):
        raise ModelLoadError(
            name, version, f"the graph gives outputs of shape {list(out.shape[1:])} per image but "
            f"model.json lists {len(spec.labels)} labels",
        )  # fmt: skip
    log.info("model %s v%d: a graph torch cannot run; %s serves it", name, version, engine.name)
    notes = [*warnings, *anatomy.warnings, f"heatmaps unavailable: {reason}"]
    return Classifier(
        name, version, spec, "cpu", anatomy, {}, notes, _no_network(name, version, reason), engine
    )
