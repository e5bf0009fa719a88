"""Image bytes -> the network's input: decode safely, orient, convert mode, resize, normalize."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import DecompressionBombError, ImageTooLargeError, InvalidImageError
from service.spec import InputSpec

# A declared size this many times larger than the file's bytes is treated as a bomb, not a photo.
BOMB_RATIO = 1000
DISPLAY_MAX_SIDE = 1024
DISPLAY_MIN_SIDE = 256  # tiny inputs (28x28 digits) are enlarged so a heatmap can be seen
# open_image() enforces CONVSERVE_MAX_PIXELS on the declared size before any pixel is decoded.
# Pillow's own global guard would only warn (from worker threads) below twice its limit.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image ready for a batch, plus what a heatmap overlay needs."""

    array: np.ndarray  # (C, H, W) float32, normalized
    display: Image.Image | None  # the oriented RGB picture (long side <= 1024), heatmaps only
    box: Box  # region of the display picture the network saw: left, top, right, bottom


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and check an image without decoding its pixels; refuse bombs before they explode."""
    if not data:
        raise InvalidImageError("no image data (0 bytes); send the bytes of an image file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"cannot identify an image in the {len(data):,} bytes sent; "
            "send a file Pillow reads (JPEG, PNG, GIF, WebP, BMP, TIFF, ...)"
        ) from None
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise InvalidImageError(f"cannot read the image header: {exc}") from None
    width, height = image.size
    pixels = width * height
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has an empty size {width}x{height}")
    if pixels > max_pixels:
        if pixels > BOMB_RATIO * len(data):
            raise DecompressionBombError(
                f"a {len(data):,}-byte file declares {width}x{height} = {pixels:,} pixels "
                f"(limit {max_pixels:,}); refused as a decompression bomb"
            )
        raise ImageTooLargeError(
            f"image is {width}x{height} = {pixels:,} pixels; the limit is {max_pixels:,}"
        )
    return image


def decode_image(data: bytes, max_pixels: int, draft: tuple[str, int] | None = None) -> Image.Image:
    """Decode the first frame with EXIF orientation applied; `draft` lets JPEG decode shrink."""
    image = open_image(data, max_pixels)
    try:
        if draft is not None and image.format == "JPEG":
            mode, side = draft
            image.draft(mode, (side, side))
        image.load()
    except MemoryError:
        raise  # the decoder's ceiling: not the image's data at fault, and not to be retried here
    except Exception as exc:
        raise InvalidImageError(f"the image data is corrupt or truncated: {exc}") from None
    # in place: without an Orientation tag the copying variant would copy every image; a
    # broken EXIF block should not cost the user their prediction
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit grey to 8 bits over the full range instead of clipping at 255."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(array.min()), float(array.max())
        scale = 1.0 if high <= 1.0 and low >= 0.0 else 1.0 / max(high - low, 1e-12)
        array = (array - (0.0 if scale == 1.0 else low)) * scale * 255.0
    elif image.mode in _SIXTEEN_BIT or array.max() > 255:
        array = array * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def to_visible(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit L or RGB; transparency is flattened onto white."""
    if image.mode in _SIXTEEN_BIT or image.mode in {"I", "F"}:
        return _sixteen_to_eight(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in {"L", "RGB"}:
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def crop_box(size: tuple[int, int], spec: InputSpec) -> Box:
    """The region of an image the network sees, in that image's own pixel coordinates."""
    width, height = size
    if spec.resize == "stretch":
        return (0.0, 0.0, float(width), float(height))
    shorter = spec.resize_size or min(spec.height, spec.width)
    scale = shorter / min(width, height)
    crop_w, crop_h = min(spec.width / scale, width), min(spec.height / scale, height)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def _normalize(image: Image.Image, spec: InputSpec, invert: bool) -> np.ndarray:
    """(pixel / 255 - mean) / std as one multiply-add per pixel; `invert` uses 255 - pixel."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    std = np.asarray(spec.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(spec.mean, dtype=np.float32) / std
    if invert:
        scale, offset = -scale, offset + 255.0 * scale
    return np.ascontiguousarray((pixels * scale + offset).transpose(2, 0, 1))  # (C, H, W)


def _display(image: Image.Image) -> Image.Image:
    """The picture heatmaps are drawn on: the upload's size, kept within 256..1024 px long."""
    rgb = image.convert("RGB")
    longest = max(rgb.size)
    if longest < DISPLAY_MIN_SIDE:
        factor = -(-DISPLAY_MIN_SIDE // longest)
        return rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST)
    rgb.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return rgb


def warm_up_decoding(spec: InputSpec) -> None:
    """Decode one JPEG and one PNG the way requests will: Pillow loads its codecs lazily, and the
    first image would otherwise pay for that (about 20 ms)."""
    ramp = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
    picture = Image.fromarray(ramp)
    for fmt in ("JPEG", "PNG"):
        encoded = io.BytesIO()
        picture.save(encoded, format=fmt)
        prepare_image(encoded.getvalue(), spec, picture.width * picture.height, keep_display=True)


def prepare_image(
    data: bytes, spec: InputSpec, max_pixels: int, *, keep_display: bool = False
) -> PreparedImage:
    """Bytes -> (C, H, W) float32 normalized as model.json says; runs in a worker thread."""
    mode = "L" if spec.channels == 1 else "RGB"
    side = max(spec.height, spec.width, spec.resize_size or 0)
    decoded = decode_image(data, max_pixels, None if keep_display else (mode, side))
    visible = to_visible(decoded)
    box = crop_box(visible.size, spec)
    # convert() to the same mode would copy the image for nothing
    source = visible if visible.mode == mode else visible.convert(mode)
    model_input = source.resize((spec.width, spec.height), _RESAMPLE[spec.interpolation], box=box)
    invert = False
    if spec.invert == "auto" and mode == "L":
        pixels = np.asarray(model_input)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        invert = bool(border.mean() > 127)
    display = None
    if keep_display:
        display = _display(visible)
        scale = display.width / visible.width
        box = (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)
    return PreparedImage(array=_normalize(model_input, spec, invert), display=display, box=box)
