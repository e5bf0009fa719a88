"""The model.json schema: what a stored model is, as typed structs, and the names and version
numbers it is stored and asked for under (no torch: routing checks them too)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from service.errors import ModelNotFoundError, VersionNotFoundError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VERSION_PATTERN = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() takes "²", int() not
SPEC_FILE = "model.json"  # written last: a version folder holding it is complete
ResizePolicy = Literal["stretch", "center_crop"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]


def check_name(name: str) -> str:
    """Model names are plain words: nothing that could walk out of the store directory."""
    if not NAME_PATTERN.fullmatch(name):
        raise ModelNotFoundError(
            f"{name!r} is not a valid model name (letters, digits, '_' and '-', at most 64)"
        )
    return name


def stored_names(root: Path) -> list[str]:
    """Model folders in a store (no torch: the supervisor checks its store before starting)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))


def stored_versions(root: Path, name: str) -> list[int]:
    """Complete versions of a model: integer directories holding model.json."""
    folder = root / check_name(name)
    if not folder.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in folder.iterdir()
        if VERSION_PATTERN.fullmatch(entry.name)
        and int(entry.name) > 0
        and (entry / SPEC_FILE).is_file()
    )


def parse_version(text: str) -> int:
    """A version number as a client writes it: 1 to 9 ASCII digits. (int() alone also takes
    '٣', ' 1' and '1_0'; str.isdigit() takes '²', which int() refuses.)"""
    if not VERSION_PATTERN.fullmatch(text):
        shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
        raise VersionNotFoundError(
            f"{shown} is not a version: versions are numbers of at most 9 ASCII digits"
        )
    return int(text)


class InputSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How an uploaded image becomes the network's (C, H, W) input."""

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    resize: ResizePolicy = "stretch"
    resize_size: int | None = None
    interpolation: Interpolation = "bilinear"
    channel_order: Literal["RGB", "BGR", "L"] = "RGB"
    # "auto" flips dark-on-light images (a digit written on paper) to the light-on-dark of MNIST.
    invert: Literal["never", "auto"] = "never"


class TrainingMetrics(msgspec.Struct, kw_only=True):
    accuracy: float | None = None
    dataset: str = ""
    samples: int | None = None
    # `convserve train --from`: the version it started from, and that version's accuracy on
    # the same held-out images
    fine_tuned_from: str | None = None
    baseline_accuracy: float | None = None


class BatchingOverrides(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_batch_size: int | None = None
    max_delay_ms: float | None = None


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The contents of model.json."""

    architecture: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    input: InputSpec
    labels: list[str]
    heatmap_layer: str
    metrics: TrainingMetrics = msgspec.field(default_factory=TrainingMetrics)
    sha256: str
    created: str
    batching: BatchingOverrides | None = None
    description: str = ""
    # None: CONVSERVE_ENGINE decides
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def read_spec(path: Path) -> ModelSpec:
    return msgspec.json.decode(path.read_bytes(), type=ModelSpec)


def encode_spec(spec: ModelSpec) -> bytes:
    return msgspec.json.format(msgspec.json.encode(spec), indent=2) + b"\n"
