"""Heatmap overlays: a 0..1 grid coloured with jet over the picture the network saw.

Only numpy and Pillow: front workers draw overlays without torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5
# jet: dark blue -> blue -> cyan -> yellow -> red -> dark red
_JET_POINTS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], np.float32
)


def _colormap() -> np.ndarray:
    positions = np.linspace(0.0, 1.0, len(_JET_POINTS))
    ramp = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(ramp, positions, _JET_POINTS[:, c]) for c in range(3)]
    return np.stack(channels, axis=1).astype(np.uint8)  # (256, 3)


JET = _colormap()


def overlay_png(
    display: Image.Image, box: tuple[float, float, float, float], grid: np.ndarray
) -> bytes:
    """Blend the 0..1 grid, coloured with jet, over the part of `display` the network saw."""
    left, top, right, bottom = (round(v) for v in box)
    width, height = max(right - left, 1), max(bottom - top, 1)
    heat = Image.fromarray(grid.astype(np.float32)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    levels = np.clip(np.asarray(heat) * 255.0, 0, 255).astype(np.uint8)
    colour = Image.fromarray(JET[levels])
    picture = display.convert("RGB")
    region = picture.crop((left, top, left + width, top + height))
    picture.paste(Image.blend(region, colour, OVERLAY_ALPHA), (left, top))
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=1)
    return out.getvalue()
