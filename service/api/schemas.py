"""Wire formats of the HTTP API, as msgspec structs (also what /schema documents)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from service.problems import Problem as Problem  # the routes' OpenAPI documents it


class Prediction(msgspec.Struct):
    label: str
    class_index: int
    probability: float


def top_predictions(probabilities: np.ndarray, labels: list[str], top_k: int) -> list[Prediction]:
    """The k most likely classes, sorted by probability (ties by class index): what /predict
    answers and what `convserve predict` writes."""
    k = min(top_k, len(labels))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(labels[i], int(i), float(probabilities[i])) for i in order]


class Heatmap(msgspec.Struct):
    method: str
    layer: str
    class_index: int
    width: int
    height: int
    grid: list[list[float]]
    png: str  # base64 PNG: the heatmap blended over the input image


class Result(msgspec.Struct, omit_defaults=True):
    predictions: list[Prediction]
    heatmap: Heatmap | None = None


class ModelRef(msgspec.Struct):
    name: str
    version: int


class PredictResponse(msgspec.Struct):
    model: ModelRef
    results: list[Result]


class VersionStatus(msgspec.Struct, omit_defaults=True):
    version: int
    status: str  # ready | loading | failed
    architecture: str | None = None
    device: str | None = None
    engine: str | None = None
    accuracy: float | None = None
    load_seconds: float | None = None
    loaded_at: str | None = None
    error: str | None = None


class RolloutStatus(msgspec.Struct):
    """A candidate tried beside the stable version (canary: answers `share` of the requests
    that name no version; shadow: also runs on `share` of them, unseen)."""

    mode: str  # canary | shadow
    candidate: int
    stable: int
    share: float
    started: str


class ModelStatus(msgspec.Struct, omit_defaults=True):
    """`rollout` shows only while one runs."""

    name: str
    ready: bool
    serving_version: int | None
    default_version: int | None
    aliases: dict[str, int]
    versions: list[VersionStatus]
    rollout: RolloutStatus | None = None


class ModelList(msgspec.Struct):
    models: list[ModelStatus]


class Health(msgspec.Struct):
    status: str
    models: dict[str, bool] = msgspec.field(default_factory=dict)


class LayerInfo(msgspec.Struct):
    name: str
    type: str
    kernel: list[int] | None
    stride: list[int] | None
    padding: list[int] | None
    output_shape: list[int]
    formula_shape: list[int] | None
    params: int
    macs: int
    receptive_field: int | None


class AnatomyInfo(msgspec.Struct):
    input_shape: list[int]
    output_shape: list[int]
    layers: list[LayerInfo]
    total_params: int
    total_macs: int
    receptive_field: int | None


class HeatmapLayer(msgspec.Struct):
    name: str
    reads: str  # the module whose output is used (a conv is read after its activation)
    kind: str
    channels: int
    height: int
    width: int


class ModelCard(msgspec.Struct):
    name: str
    version: int
    architecture: str
    arguments: dict[str, Any]
    description: str
    created: str
    sha256: str
    device: str
    engine: str  # what plain predictions run on; heatmaps always use torch
    labels: list[str]
    input: dict[str, Any]
    metrics: dict[str, Any]
    heatmap_layer: str
    heatmap_layers: list[HeatmapLayer]
    batching: dict[str, float]
    anatomy: AnatomyInfo
    warnings: list[str]
    heatmaps_unavailable: str | None = None  # why there are no heatmaps; None: there are
