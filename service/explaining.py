"""`convserve explain`: one image's heatmap written as a PNG, without a server."""

from __future__ import annotations

from pathlib import Path

import torch

from service.config import Settings
from service.errors import ServiceError, UnreadableFileError
from service.imaging import DecodeLimits, configure_decoding, prepare_image
from service.loading import resolve_device
from service.overlay import overlay_png
from service.store import ModelStore


def explain_file(
    settings: Settings,
    image: Path,
    output: Path,
    *,
    model: str | None,
    version: int | None,
    method: str,
    layer: str | None,
    target: int | None,
) -> str:
    """Write the overlay PNG; return a one-line summary with the top class. The store, device,
    default model and decode limits are the server's settings (CONVSERVE_* or flags)."""
    if target is not None and method != "gradcam":
        raise ValueError(f"--target explains one class with gradcam; {method} maps take none")
    store = ModelStore(settings.store)
    name, number = store.resolve(model or settings.default_model, version)
    classifier = store.load(name, number, resolve_device(settings.device))
    classes = len(classifier.labels)
    if target is not None and target >= classes:
        raise ValueError(
            f"--target {target} is not a class of {name} v{number}: its {classes} classes "
            f"are 0..{classes - 1}"
        )
    configure_decoding(settings.max_pixels)  # one image in a one-shot process: the global is ours
    limits = DecodeLimits(settings.max_pixels, settings.formats)
    try:
        prepared = prepare_image(
            image.read_bytes(), classifier.spec.input, limits, keep_display=True
        )
    except ServiceError as exc:  # undecodable, too large, a format not allowed
        raise UnreadableFileError(f"{image}: {exc.detail}") from None
    assert prepared.display is not None
    result = classifier.explain([prepared.array], method, layer, [target])
    output.write_bytes(overlay_png(prepared.display, prepared.box, result.grids[0]))
    best = int(torch.tensor(result.probabilities[0]).argmax())
    label = classifier.labels[best]
    what = f"class {classifier.labels[result.targets[0]]!r}" if method == "gradcam" else "mean"
    return (
        f"{name} v{number}: top class {label!r} (p={result.probabilities[0][best]:.4f}); "
        f"{method} ({what}) at {result.point.layer} -> {output}"
    )
