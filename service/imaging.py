"""Image bytes -> the network's input: decode safely, orient, convert mode, resize, normalize."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.config import FORMATS, Settings
from service.errors import (
    DecompressionBombError,
    ImageTooLargeError,
    InvalidImageError,
    ServiceError,
    UnsupportedImageFormatError,
)
from service.spec import InputSpec

# A declared size this many times larger than the file's bytes is treated as a bomb, not a photo.
BOMB_RATIO = 1000
DISPLAY_MAX_SIDE = 1024
DISPLAY_MIN_SIDE = 256  # tiny inputs (28x28 digits) are enlarged so a heatmap can be seen
NO_DATA = "no image data (0 bytes); send the bytes of an image file"
BAND_PIXELS = 1 << 20  # wide conversions run over bands of rows this large, not whole images

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
# round(v * 255 / 65535) for every 16-bit value, in integers: (v + 128) // 257
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
_PILLOW_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_PILLOW_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost and which Pillow plugins may read the bytes."""

    max_pixels: int
    formats: tuple[str, ...] = FORMATS

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(settings.max_pixels, settings.formats)


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image ready for a batch, plus what a heatmap overlay needs."""

    array: np.ndarray  # (C, H, W) float32, normalized
    display: Image.Image | None  # the oriented RGB picture (long side <= 1024), heatmaps only
    box: Box  # region of the display picture the network saw: left, top, right, bottom


def configure_decoding(max_pixels: int) -> int:
    """Pillow's bomb guard at our pixel limit, its warning band (1x to 2x) an error; returns the
    limit it replaced, for an app that stops to put back.

    Only this guard sees the frames inside containers (ICO, ICNS, MPO, GIF frames, TIFF
    tiles) before they are allocated; our own check sees the declared size alone. Both are
    process-wide Pillow/warnings state: call once per process, before decode threads start
    (per-call catch_warnings would not be thread-safe)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    found = Image.MAX_IMAGE_PIXELS or max_pixels  # never hand back None: that switches it off
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    return found


def _too_large(
    pixels: int, nbytes: int, limits: DecodeLimits, what: str, size: tuple[int, int] | None = None
) -> ImageTooLargeError:
    """A bomb when the size is out of all proportion to the bytes sent, else just too large."""
    shown = f"{size[0]}x{size[1]} = {pixels:,}" if size else f"{pixels:,}"
    if pixels > BOMB_RATIO * nbytes:
        return DecompressionBombError(
            f"{what} declares {shown} pixels in a {nbytes:,}-byte file "
            f"(limit {limits.max_pixels:,}); refused as a decompression bomb"
        )
    return ImageTooLargeError(f"{what} is {shown} pixels; the limit is {limits.max_pixels:,}")


def _refused(exc: Exception, nbytes: int, limits: DecodeLimits, what: str) -> ImageTooLargeError:
    """Pillow's guard tripped: our error, with the size Pillow saw."""
    found = _PILLOW_PIXELS.search(str(exc))
    if found is None:  # Pillow reworded its message: refuse all the same
        return DecompressionBombError(
            f"{what} exceeds the limit of {limits.max_pixels:,} pixels; refused as a "
            f"decompression bomb ({exc})"
        )
    return _too_large(int(found[1]), nbytes, limits, what)


def _check_size(image: Image.Image, nbytes: int, limits: DecodeLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise _too_large(width * height, nbytes, limits, f"the {image.format} image", image.size)


def detect_format(data: bytes) -> str | None:
    """The Pillow format whose signature the bytes start with, from each plugin's `accept`
    test on the first 16 bytes: no plugin outside the allowlist ever parses the file."""
    Image.init()  # registers every plugin's signature test; reads nothing
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):  # a signature test may trip on odd prefixes
            if accept is not None and accept(data[:16]):
                return name
    return None


def _unidentified(data: bytes, limits: DecodeLimits) -> ServiceError:
    """415 for a format we recognise but do not allow, 400 for bytes nobody can identify."""
    detected = detect_format(data)
    allowed = ", ".join(limits.formats)
    if detected is not None and detected not in limits.formats:
        return UnsupportedImageFormatError(  # a 4-byte signature can be shared: "looks like"
            f"the image looks like {detected} (by its first bytes), a format this server does "
            f"not decode; allowed formats: {allowed} (CONVSERVE_FORMATS)"
        )
    looks = f"; it starts like {detected} but its header is malformed" if detected else ""
    return InvalidImageError(
        f"cannot identify an image in the {len(data):,} bytes sent{looks}; "
        f"send a file in one of: {allowed}"
    )


def unidentified(data: bytes, limits: DecodeLimits) -> ServiceError | None:
    """What open_image raises for bytes that no allowed format's signature test accepts, known
    from their first 16 bytes alone; None when some plugin would read further."""
    if not data:
        return InvalidImageError(NO_DATA)
    Image.init()
    for name in limits.formats:
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        if accept is None:
            return None  # a plugin without a signature test reads every file
        try:
            accepted = accept(data[:16])
        except Exception:
            return None
        if accepted and not isinstance(accepted, str):  # a str: Pillow's warning, not a match
            return None
    return _unidentified(data, limits)


def open_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open and check an image without decoding its pixels; refuse bombs before they explode."""
    if not data:
        raise InvalidImageError(NO_DATA)
    try:
        # only the allowed plugins look at the bytes; JPEG may hand over to MPO, whose first
        # frame is a plain JPEG
        image = Image.open(io.BytesIO(data), formats=limits.formats)
    except UnidentifiedImageError:
        raise _unidentified(data, limits) from None
    except _PILLOW_BOMB as exc:  # the image, or a frame a container (ICO) reads while opening
        name = detect_format(data)
        raise _refused(
            exc, len(data), limits, f"the {name} image" if name else "the image"
        ) from None
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise InvalidImageError(f"cannot read the image header: {exc}") from None
    _check_size(image, len(data), limits)  # also when Pillow's global guard is set higher
    return image


def decode_image(
    data: bytes,
    limits: DecodeLimits,
    draft: tuple[str, int] | None = None,
    admit: Callable[[Image.Image], None] | None = None,
) -> Image.Image:
    """Decode the first frame with EXIF orientation applied; `draft` lets JPEG decode shrink;
    `admit` sees the opened header before any pixel is decoded, and may raise to stop."""
    image = open_image(data, limits)
    if admit is not None:
        admit(image)
    try:
        if draft is not None and image.format == "JPEG":
            mode, side = draft
            image.draft(mode, (side, side))
        image.load()
    except MemoryError:
        raise  # the decoder's ceiling: not the image's data at fault, and not to be retried here
    except _PILLOW_BOMB as exc:  # a frame inside a container (ICO, ICNS, ...) is the bomb
        raise _refused(exc, len(data), limits, "an embedded frame") from None
    except Exception as exc:
        raise InvalidImageError(f"the image data is corrupt or truncated: {exc}") from None
    _check_size(image, len(data), limits)  # a container may load another size (ICO does)
    # in place: without an Orientation tag the copying variant would copy every image; a
    # broken EXIF block should not cost the user their prediction
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _banded(image: Image.Image, convert: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """8-bit L from `convert` applied to bands of rows (a very wide row is cut too): a 40 MP
    image never has a whole-image numpy copy, only the L result and one band at a time."""
    width, height = image.size
    result = Image.new("L", image.size)
    rows, columns = max(1, BAND_PIXELS // width), min(width, BAND_PIXELS)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            box = (left, top, min(left + columns, width), min(top + rows, height))
            band = np.asarray(image.crop(box))
            result.paste(Image.fromarray(convert(band).astype(np.uint8)), box[:2])
    return result


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit grey to 8 bits over the full range instead of clipping at 255."""
    if image.mode in _SIXTEEN_BIT:
        return _banded(image, lambda band: np.take(_SIXTEEN_TO_EIGHT, band))
    low, high = cast("tuple[float, float]", image.getextrema())  # one band: (min, max)
    if image.mode == "F":
        # values in 0..1 are a fraction of white; anything else is stretched over its range
        offset, scale = (
            (0.0, 1.0) if low >= 0.0 and high <= 1.0 else (low, 1.0 / max(high - low, 1e-12))
        )

        def stretch(band: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN -> black, inf clips
                scaled = np.nan_to_num((band.astype(np.float64) - offset) * scale * 255.0)
            return np.clip(np.rint(scaled), 0, 255)

        return _banded(image, stretch)
    if high > 255:  # 32-bit integers holding 16-bit data: scale them, clip the rest
        return _banded(image, lambda band: np.take(_SIXTEEN_TO_EIGHT, np.clip(band, 0, 65535)))
    return _banded(image, lambda band: np.clip(band, 0, 255))


def to_visible(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit L or RGB; transparency is flattened onto white."""
    if image.mode in _SIXTEEN_BIT or image.mode in {"I", "F"}:
        return _sixteen_to_eight(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        # pasting through the alpha onto white equals alpha_composite over opaque white, pixel
        # for pixel, without two more full-size RGBA copies
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba)
        return flat
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
    longest = max(image.size)
    if longest < DISPLAY_MIN_SIDE:
        factor = -(-DISPLAY_MIN_SIDE // longest)
        size = (image.width * factor, image.height * factor)
        return image.convert("RGB").resize(size, Image.Resampling.NEAREST)
    # shrunk before grey becomes RGB: resampling three equal bands is resampling one, and a
    # 40 MP grey upload is not copied to 120 MB of RGB first
    shown = image.copy()  # thumbnail() works in place
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return shown.convert("RGB")


def png_image(data: bytes, limits: DecodeLimits) -> bytes:
    """The picture as an 8-bit PNG (first frame, EXIF orientation applied, L or RGB with
    transparency on white): how a labelled image is kept for training, readable by any loader."""
    out = io.BytesIO()
    to_visible(decode_image(data, limits)).save(out, format="PNG")
    return out.getvalue()


def warm_up_decoding(spec: InputSpec, limits: DecodeLimits) -> None:
    """Decode one JPEG and one PNG (those allowed) the way requests will: Pillow loads its codecs
    lazily, and the first image would otherwise pay for that (about 20 ms)."""
    width = min(64, limits.max_pixels)  # within the pixel limit, however low it is set
    height = max(1, min(48, limits.max_pixels // width))
    ramp = np.linspace(0, 255, width * height * 3).astype(np.uint8).reshape(height, width, 3)
    picture = Image.fromarray(ramp)
    for fmt in ("JPEG", "PNG"):
        if fmt in limits.formats:
            encoded = io.BytesIO()
            picture.save(encoded, format=fmt)
            prepare_image(encoded.getvalue(), spec, limits, keep_display=True)


def prepare_image(
    data: bytes,
    spec: InputSpec,
    limits: DecodeLimits,
    *,
    keep_display: bool = False,
    admit: Callable[[Image.Image], None] | None = None,
) -> PreparedImage:
    """Bytes -> (C, H, W) float32 normalized as model.json says (`admit`: see decode_image)."""
    mode = "L" if spec.channels == 1 else "RGB"
    side = max(spec.height, spec.width, spec.resize_size or 0)
    decoded = decode_image(data, limits, None if keep_display else (mode, side), admit)
    visible = to_visible(decoded)
    box = crop_box(visible.size, spec)
    # convert() to the same mode would copy the image for nothing; grey for an RGB network is
    # resized first (three equal bands resample as one) and only the small result converted
    grey_to_rgb = visible.mode == "L" and mode == "RGB"
    source = visible if visible.mode == mode or grey_to_rgb else visible.convert(mode)
    model_input = source.resize((spec.width, spec.height), _RESAMPLE[spec.interpolation], box=box)
    if grey_to_rgb:
        model_input = model_input.convert("RGB")
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
