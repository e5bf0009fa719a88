"""Writes tests/data/corpus/: hostile and odd inputs, each with the answer the service owes it.

    .venv/bin/python -m tests.data.make_corpus

Everything is generated (seeded), never hand-edited; manifest.json lists each case with its
content type, the expected status and, for images that must classify, the expected class.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.support import digit_picture, encodings, held_out_digits, png_bytes

HERE = Path(__file__).resolve().parent / "corpus"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge grey image, with one compressed row: tiny on disk."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", row)
        + png_chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A GIF whose logical screen and first frame claim 65535 x 65535 pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + frame


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += (
            (
                f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def minimal_pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 28 28]>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )


SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">
<text x="8" y="22" font-size="24" fill="white">7</text></svg>
"""


def cases() -> list[tuple[dict[str, Any], bytes]]:
    """(manifest entry, file bytes) for every case."""
    rng = np.random.default_rng(7)
    digits = held_out_digits(6)
    picture = digit_picture(digits[0])
    formats = encodings(picture)
    jpeg, png = formats["jpeg"][1], formats["png"][1]
    frames = [digit_picture(d).convert("P") for d in digits[:5]] * 10  # 50 frames
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    wide = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), 391)[None, :100_000])
    boundary = "convserve-corpus"
    good = png_bytes(digits[1].image)

    def entry(
        name: str, content_type: str, status: int, fragment: str = "", **extra: Any
    ) -> dict[str, Any]:
        return {
            "name": name,
            "content_type": content_type,
            "status": status,
            "detail": fragment,
            **extra,
        }

    label = digits[0].label
    return [
        (entry("empty", "image/png", 400, "no image data"), b""),
        (entry("truncated-jpeg", "image/jpeg", 400, "truncated"), jpeg[: len(jpeg) // 2]),
        (entry("truncated-png", "image/png", 400, "truncated"), png[: len(png) // 2]),
        (entry("random-bytes", "image/jpeg", 400, "cannot identify"), rng.bytes(4096)),
        (entry("text-as-png", "image/png", 400, "cannot identify"), b"just some text\n" * 20),
        (entry("html-as-jpeg", "image/jpeg", 400, "cannot identify"),
         b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        (entry("json-as-png", "image/png", 400, "cannot identify"), b'{"image": "not really"}'),
        (entry("png-bomb", "image/png", 400, "decompression bomb"), png_bomb(100_000, 100_000)),
        (entry("gif-bomb", "image/gif", 400, "decompression bomb"), gif_bomb()),
        (entry("one-by-100000", "image/png", 200), png_bytes(wide)),
        (entry("svg", "image/svg+xml", 415, "vector format"), SVG),
        (entry("svg-as-png", "image/png", 400, "cannot identify"), SVG),
        (entry("pdf", "application/pdf", 415, "not accepted"), minimal_pdf()),
        (entry("pdf-as-png", "image/png", 400, "cannot identify"), minimal_pdf()),
        (entry("animated-50-frames", "image/gif", 200, label=label), animated.getvalue()),
        (entry("cmyk-jpeg", "image/jpeg", 200, label=label), formats["jpeg-cmyk"][1]),
        (entry("png-16bit", "image/png", 200, label=label), formats["png-16bit"][1]),
        (entry("png-palette", "image/png", 200, label=label), formats["png-palette"][1]),
        (entry("png-alpha", "image/png", 200, label=label), formats["png-alpha"][1]),
        (entry("exif-rotated", "image/jpeg", 200, label=label), formats["jpeg-exif-rotated"][1]),
        (entry("multipart-empty-part", f"multipart/form-data; boundary={boundary}", 400,
               "file 2 (b.png): no image data"),
         multipart([("file", "a.png", good), ("file", "b.png", b"")], boundary)),
        (entry("multipart-300-parts", f"multipart/form-data; boundary={boundary}", 413,
               "the limit is 256 images"),
         multipart([("file", f"{i}.png", b"x") for i in range(300)], boundary)),
        (entry("multipart-wrong-boundary", "multipart/form-data; boundary=not-the-one", 400,
               "malformed multipart"),
         multipart([("file", "a.png", good)], boundary)),
        (entry("multipart-no-boundary", "multipart/form-data", 400, "without a boundary"),
         multipart([("file", "a.png", good)], boundary)),
        (entry("multipart-no-file-part", f"multipart/form-data; boundary={boundary}", 400,
               "no `file` part"),
         multipart([("note", None, b"hello")], boundary)),
    ]  # fmt: skip


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    manifest = []
    for entry, data in cases():
        entry["file"] = f"{entry['name']}.bin"
        (HERE / entry["file"]).write_bytes(data)
        manifest.append(entry)
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} cases to {HERE}")


if __name__ == "__main__":
    main()
