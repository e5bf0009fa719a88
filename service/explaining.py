"""`convserve explain`: one image's heatmap written as a PNG, without a server."""

from __future__ import annotations

from pathlib import Path

import torch

from service.imaging import DecodeLimits, configure_decoding, prepare_image
from service.loading import resolve_device
from service.overlay import overlay_png
from service.store import ModelStore

MAX_PIXELS = 40_000_000


def explain_file(
    store_root: Path,
    image: Path,
    output: Path,
    *,
    model: str | None,
    version: int | None,
    method: str,
    layer: str | None,
    target: int | None,
) -> str:
    """Write the overlay PNG; return a one-line summary with the top class."""
    store = ModelStore(store_root)
    names = store.names()
    if not names:
        raise ValueError(f"no models in {store_root}")
    name = model or names[0]
    number = version or max(store.versions(name), default=0)
    classifier = store.load(name, number, resolve_device("auto"))
    configure_decoding(MAX_PIXELS)  # one image in a one-shot process: the global is ours
    prepared = prepare_image(
        image.read_bytes(), classifier.spec.input, DecodeLimits(MAX_PIXELS), keep_display=True
    )
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
