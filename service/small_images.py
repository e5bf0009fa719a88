"""SmallImages: a front worker decodes small images itself, without a round trip to a decoder.

A decoder child exists for two reasons: an allocation past the ceiling dies there, and a decode
past its request's deadline can be killed. Neither can happen to an image whose whole cost is
bounded by its header: an 8-bit grey or RGB PNG, or a baseline JPEG, of at most `MAX_PIXELS`
declared pixels (these formats decode exactly the size they declare) in a body of at most
`MAX_BYTES`, made into a model input of at most `MAX_VALUES` numbers. Such an image costs at
most about 2 ms of CPU and 1 MB here, while a decoder spends about 2.5 times a digit's decode
on the trip there and back (docs/processes.md). Used only in front workers: they hold neither
the models nor the queue, which the single process keeps safe by decoding everything in
children.

Anything else goes to the decoders, and so does anything that fails here in a way that is
not one of our errors. Our errors (a bomb by its header, a corrupt file) are the decoders' own,
word for word: the same code under the same limits, Pillow's bomb guard included. So a small
GIF's header is checked here too, and bytes that no allowed format's signature matches are
refused from their first 16 bytes: such requests never wait for a decoder's turn. A PNG with
compressed text or an ICC profile goes to the decoders (Pillow inflates those while it reads
the header).
"""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image

from service.errors import ServiceError
from service.imaging import (
    DecodeLimits,
    PreparedImage,
    configure_decoding,
    prepare_image,
    unidentified,
)
from service.spec import InputSpec

MAX_BYTES = 64 * 1024
MAX_PIXELS = 300 * 300  # a 280x280 digit; at most ~2 ms to decode and resize on a slow core
MAX_VALUES = 3 * 64 * 64  # model input: MNIST's 784 and CIFAR's 3072 fit, 3x224x224 does not
PNG = b"\x89PNG\r\n\x1a\n"
SIGNATURES = {PNG: "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF"}
FORMATS = {"PNG", "JPEG"}  # decoded here; a GIF's header is only checked (its frames vary)
MODES = {"L", "RGB"}
INFLATED = {b"zTXt", b"iTXt", b"iCCP"}  # PNG chunks Pillow inflates (up to 64 MB) on open
CHUNK = struct.Struct(">I4s")


class DeclinedError(Exception):
    """Not small by its header: for the decoders."""


def _admit(decode: bool, image: Image.Image) -> None:
    """Called on the opened header, before any pixel is decoded: its size and format passed
    the limits; whether to decode it here."""
    width, height = image.size
    if not decode or image.format not in FORMATS or image.mode not in MODES:
        raise DeclinedError
    if width * height > MAX_PIXELS:
        raise DeclinedError
    if image.info.get("progressive") or image.info.get("progression"):
        raise DeclinedError  # a progressive JPEG's cost grows with its scans, not its pixels


def _inflates(data: bytes) -> bool:
    """Whether a PNG holds compressed text or an ICC profile, which Pillow inflates while it
    reads the header (64 KiB could become 64 MB): those go to the decoders, under their
    ceiling."""
    offset = len(PNG)
    while offset + CHUNK.size <= len(data):
        length, kind = CHUNK.unpack_from(data, offset)
        if kind in INFLATED:
            return True
        offset += CHUNK.size + length + 4  # the chunk's data, then its CRC
    return False


class SmallImages:
    """The inline decode of one front worker, in one thread of its own: off the event loop, one
    at a time. Process-wide
    Pillow settings: create one per process."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.formats = FORMATS & set(limits.formats)
        configure_decoding(limits.max_pixels)  # as in the decoders; before the thread starts
        # not niced below the event loop, as the decoders are: this thread shares the loop's
        # interpreter lock, and a lock holder the kernel starves stalls the loop (inversion)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="convserve-small")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def refusal(self, data: bytes) -> ServiceError | None:
        """The decoders' own error for bytes no allowed format's signature matches (a PDF, an
        HTML page): known from 16 bytes, so garbage never waits for a decoder."""
        return unidentified(data, self.limits)

    def accepts(self, data: bytes) -> bool:
        """Small, and in an allowed format whose header may be read here."""
        if len(data) > MAX_BYTES:
            return False
        return any(data.startswith(sig) and SIGNATURES[sig] in self.formats for sig in SIGNATURES)

    async def prepare(
        self, data: bytes, spec: InputSpec, keep_display: bool
    ) -> PreparedImage | ServiceError | None:
        """The image prepared here; or the error the decoders would give it (same code, same
        limits: a bomb, a corrupt file); or None: declined, the decoders take it. Only the
        header is read when the model's input is large or a heatmap needs the picture."""
        decode = not keep_display and spec.channels * spec.height * spec.width <= MAX_VALUES
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._prepare, data, spec, decode)
        except RuntimeError:  # closed: the worker is stopping
            return None

    def _prepare(
        self, data: bytes, spec: InputSpec, decode: bool
    ) -> PreparedImage | ServiceError | None:
        if data.startswith(PNG) and _inflates(data):
            return None
        try:
            return prepare_image(data, spec, self.limits, admit=partial(_admit, decode))
        except DeclinedError:
            return None
        except ServiceError as exc:
            return exc
        except Exception:  # not one of ours: the decoders decide, in their own words
            return None
