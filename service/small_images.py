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

Anything else goes to the decoders, and so does anything that fails here: their answer, error
message included, is the one the client gets. Pillow's bomb guard is on here too, and the PNG
text limits are tightened for this process (a small file may inflate to 64 MB of text).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, PngImagePlugin

from service.imaging import DecodeLimits, PreparedImage, configure_decoding, prepare_image
from service.spec import InputSpec

MAX_BYTES = 64 * 1024
MAX_PIXELS = 300 * 300  # a 280x280 digit; at most ~2 ms to decode and resize on a slow core
MAX_VALUES = 3 * 64 * 64  # model input: MNIST's 784 and CIFAR's 3072 fit, 3x224x224 does not
MAX_TEXT_BYTES = 64 * 1024  # per PNG text chunk, and in all (Pillow's own: 1 MB and 64 MB)
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
FORMATS = set(SIGNATURES.values())
MODES = {"L", "RGB"}


class DeclinedError(Exception):
    """Not small by its header: for the decoders."""


def _admit(image: Image.Image) -> None:
    """Called on the opened header, before any pixel is decoded."""
    width, height = image.size
    if width * height > MAX_PIXELS or image.mode not in MODES or image.format not in FORMATS:
        raise DeclinedError
    if image.info.get("progressive") or image.info.get("progression"):
        raise DeclinedError  # a progressive JPEG's cost grows with its scans, not its pixels


class SmallImages:
    """The inline decode of one front worker, in one thread of its own: off the event loop, so
    a flood of small images cannot delay a health check, and one at a time. Process-wide
    Pillow settings: create one per process."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.formats = FORMATS & set(limits.formats)
        configure_decoding(limits.max_pixels)  # before the thread starts
        PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_TEXT_BYTES)
        PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_TEXT_BYTES)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="convserve-small")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def accepts(self, data: bytes, spec: InputSpec, keep_display: bool) -> bool:
        """What the request tells before the header is read: small, in an allowed format."""
        if keep_display or len(data) > MAX_BYTES:
            return False
        if spec.channels * spec.height * spec.width > MAX_VALUES:
            return False
        return any(data.startswith(sig) and SIGNATURES[sig] in self.formats for sig in SIGNATURES)

    async def prepare(self, data: bytes, spec: InputSpec) -> PreparedImage | None:
        """The image prepared here, or None: declined or failed, the decoders take it."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._prepare, data, spec)
        except RuntimeError:  # closed: the worker is stopping
            return None

    def _prepare(self, data: bytes, spec: InputSpec) -> PreparedImage | None:
        try:
            return prepare_image(data, spec, self.limits, admit=_admit)
        except Exception:  # declined, or an error the decoders will name in their own words
            return None
