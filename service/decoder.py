"""The decoder child (`python -m service.decoder CONFIG FD`): decodes images under a memory ceiling.

It imports Pillow and NumPy, never torch, so it can take an address-space limit: an allocation
past the ceiling fails here (MemoryError, or at worst this process dies), never in the process
that holds the models and the queue. Jobs and answers cross one socket as msgpack structs of
plain bytes and numbers: the parent never unpickles anything a decoder sends.
"""

from __future__ import annotations

import os
import resource
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image

from service.errors import ServiceError
from service.imaging import (
    DecodeLimits,
    PreparedImage,
    configure_decoding,
    png_image,
    prepare_image,
    warm_up_decoding,
)
from service.spec import InputSpec

READY = b"ready"
# Below the event loop and the inference thread, so a flood of heavy images leaves the process
# that answers health checks its share of the cores; not far below, or decoding starves while
# torch runs and batches shrink (niceness 10: resnet18 at 32 clients 44.6 req/s, mean batch 3.4;
# 5: 56.9 req/s, mean batch 14.9; docs/benchmarks.md).
DECODER_NICENESS = 5
MIB = 1024 * 1024
WARM_UP_SPEC = InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.5] * 3)


class DecoderConfig(msgspec.Struct, frozen=True):
    """What a decoder is told at start (explicitly, on its command line)."""

    max_pixels: int
    formats: tuple[str, ...]
    memory_mb: int

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels, self.formats)


class DecodeJob(msgspec.Struct, array_like=True):
    data: bytes
    spec: InputSpec | None  # None: re-encode the picture as a PNG (a reviewed capture)
    keep_display: bool


class Decoded(msgspec.Struct, array_like=True):
    """One answer: the array and display picture as raw bytes, or an error by class name."""

    array: bytes = b""  # (C, H, W) float32, native byte order
    shape: tuple[int, int, int] = (0, 0, 0)
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    display: bytes = b""  # RGB, heatmap requests only
    display_size: tuple[int, int] = (0, 0)
    error: str = ""  # a ServiceError subclass name from service.errors
    detail: str = ""
    exiting: bool = False  # the decoder stops after this answer (it ran out of memory)
    png: bytes = b""  # the answer to a PNG job


def encode_prepared(prepared: PreparedImage) -> Decoded:
    array = np.ascontiguousarray(prepared.array, dtype=np.float32)
    channels, height, width = array.shape
    display = prepared.display
    return Decoded(
        array=array.tobytes(),
        shape=(channels, height, width),
        box=prepared.box,
        display=b"" if display is None else display.tobytes(),
        display_size=(0, 0) if display is None else display.size,
    )


def decode_prepared(answer: Decoded) -> PreparedImage:
    array = np.frombuffer(answer.array, dtype=np.float32).reshape(answer.shape)
    display = None
    if answer.display:
        display = Image.frombytes("RGB", answer.display_size, answer.display)
    return PreparedImage(array=array, display=display, box=answer.box)


def _address_space() -> int:
    """This process's mapped address space in bytes (VmSize), read from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def set_ceiling(memory_mb: int) -> None:
    """Allow `memory_mb` of address space above what the interpreter and its imports use."""
    used = _address_space()
    if used:
        limit = used + memory_mb * MIB
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _answer(job: DecodeJob, config: DecoderConfig) -> Decoded:
    """The image prepared (or as a PNG), or why not; after a MemoryError the decoder exits and
    is replaced."""
    try:
        if job.spec is None:
            return Decoded(png=png_image(job.data, config.limits))
        prepared = prepare_image(job.data, job.spec, config.limits, keep_display=job.keep_display)
        return encode_prepared(prepared)
    except ServiceError as exc:
        return Decoded(error=type(exc).__name__, detail=exc.detail)
    except MemoryError:
        detail = (
            f"decoding this image needs more than the {config.memory_mb} MB decode ceiling "
            "(CONVSERVE_DECODE_MEMORY_MB); send a smaller image"
        )
        return Decoded(error="ImageTooLargeError", detail=detail, exiting=True)
    except Exception as exc:  # a plugin failing on hostile data is the image's fault
        detail = f"the image could not be decoded: {type(exc).__name__}: {exc}"
        return Decoded(error="InvalidImageError", detail=detail[:500])


def serve(conn: Connection, config: DecoderConfig) -> None:
    jobs = msgspec.msgpack.Decoder(DecodeJob)
    answers = msgspec.msgpack.Encoder()
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent went away
        answer = _answer(jobs.decode(raw), config)
        conn.send_bytes(answers.encode(answer))
        if answer.exiting:
            return


def main(argv: list[str]) -> int:
    config = msgspec.json.decode(argv[0], type=DecoderConfig)
    conn = Connection(int(argv[1]))
    os.nice(DECODER_NICENESS)
    configure_decoding(config.max_pixels)  # Pillow's own bomb guard, at our limit
    warm_up_decoding(WARM_UP_SPEC, config.limits)  # codecs load lazily: before the ceiling
    set_ceiling(config.memory_mb)
    conn.send_bytes(READY)
    serve(conn, config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
