"""Writes tests/data/corpus/: hostile and odd inputs, each with the answer the service owes it.

    PYTHONPATH=$PWD .venv/bin/python -m tests.data.make_corpus

Everything is generated (seeded), never hand-edited. The corpus grows by the class, not by the
file: each function below makes one class of input (a container with a huge embedded frame, a
tiny file declaring a huge canvas in one format, a header flood, a V2 amplification, ...).

manifest.json lists each case:
- "kind": "upload": the file is a /predict body sent with "content_type"; "label" is the class
  an image that must classify gets.
- "kind": "http": the file is a whole raw HTTP/1.1 request (it closes its connection).
and for both, "status" (the status the service owes it, or "closed" where the server may only
drop the connection) and "detail" (a fragment of the problem+json detail).
Uploads are .bin files, the fuzzer's seeds, except the "heavy" ones (slow but legal: they would
spend the fuzzer's time inflating megabytes, not finding paths), which are .heavy files;
requests are .http files.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.support import Digit, digit_picture, encodings, held_out_digits, png_bytes

HERE = Path(__file__).resolve().parent / "corpus"
MODEL = "digits"  # the bundled model V2 requests name
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Just under CONVSERVE_MAX_PIXELS' default (40,000,000): legal, but slow and heavy to decode.
LARGEST_LEGAL_SIDE = 6324  # 6324 x 6324 = 39,992,976 pixels


# --- images -----------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge grey image, with one compressed row: tiny on disk."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1), 9)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")
    return PNG_MAGIC + chunks


def png_16bit_largest_legal(digit: Digit) -> bytes:
    """A 16-bit grey PNG of 6324 x 6324 px (the digit, enlarged nearest-neighbour): about 80 KB
    on disk, 80 MB of samples once decoded. Written row by row: repeated rows use the Up filter
    (all zeros), so deflate packs them about 1000:1."""
    side = LARGEST_LEGAL_SIDE
    source = np.asarray(digit.image, dtype=np.uint16) * 257
    columns = np.arange(side) * source.shape[1] // side
    rows = np.arange(side) * source.shape[0] // side
    compressor = zlib.compressobj(9)
    chunks, previous = [], -1
    repeated = b"\2" + b"\0" * (2 * side)
    for row in rows:
        if row == previous:
            chunks.append(compressor.compress(repeated))
        else:
            chunks.append(compressor.compress(b"\0" + source[row, columns].astype(">u2").tobytes()))
        previous = row
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (
        PNG_MAGIC
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(chunks))
        + png_chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A GIF whose logical screen and first frame claim 65535 x 65535 pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + frame


def jpeg_bomb(jpeg: bytes) -> bytes:
    """A real JPEG whose frame header (SOF) is rewritten to declare 65500 x 65500 pixels."""
    at = 2
    while jpeg[at] == 0xFF and jpeg[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack_from(">H", jpeg, at + 2)[0]
    # SOF: marker(2) length(2) precision(1) height(2) width(2)
    return jpeg[: at + 5] + struct.pack(">HH", 65500, 65500) + jpeg[at + 9 :]


def riff_webp(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)


def webp_frame(picture: Image.Image, lossless: bool) -> bytes:
    """The VP8 or VP8L chunk of a real WebP of `picture`."""
    data = png_bytes(picture, "WEBP", lossless=lossless, quality=80)
    assert data[12:16] == (b"VP8L" if lossless else b"VP8 ")
    return data[12:]


def webp_vp8_bomb(picture: Image.Image) -> bytes:
    """Lossy WebP whose VP8 key frame header declares 16383 x 16383 (the format's largest)."""
    frame = bytearray(webp_frame(picture, lossless=False))
    assert frame[11:14] == b"\x9d\x01\x2a"  # chunk header (8) + frame tag (3) + start code
    struct.pack_into("<HH", frame, 14, 16383, 16383)
    return riff_webp(bytes(frame))


def webp_vp8l_bomb(picture: Image.Image) -> bytes:
    """Lossless WebP whose VP8L header declares 16384 x 16384."""
    frame = bytearray(webp_frame(picture, lossless=True))
    assert frame[8] == 0x2F
    (bits,) = struct.unpack_from("<I", frame, 9)
    bits = (bits & ~0xFFFFFFF) | (16383 << 14) | 16383
    struct.pack_into("<I", frame, 9, bits)
    return riff_webp(bytes(frame))


def webp_vp8x_bomb(picture: Image.Image) -> bytes:
    """An extended WebP: a small real frame on a declared 100000 x 100000 canvas (legal: the
    frame fits in the canvas), so decoding allocates the canvas, 40 GB of RGBA."""
    canvas = struct.pack("<I", 0) + (99999).to_bytes(3, "little") + (99999).to_bytes(3, "little")
    return riff_webp(webp_chunk(b"VP8X", canvas), webp_frame(picture, lossless=False))


def bmp_bomb() -> bytes:
    """An 8-bit RLE BMP of 65535 x 65535 whose pixel data is one end-of-bitmap code: legal."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    pixels = b"\0\1"  # RLE8 end of bitmap: every remaining pixel is index 0
    info = struct.pack("<IiiHHIIiiII", 40, 65535, 65535, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


# TIFF tags
WIDTH, LENGTH, BITS, COMPRESSION, PHOTOMETRIC = 256, 257, 258, 259, 262
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTES = 273, 277, 278, 279
TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTES = 322, 323, 324, 325
DEFLATE = 8


def tiff(pages: Iterable[tuple[dict[int, int], bytes, bool]]) -> bytes:
    """A little-endian TIFF of 8-bit grey pages: (tags, deflated data, tiled?) each, one strip
    or tile per page. Offsets and byte counts are filled in here."""
    out = bytearray(b"II*\0\0\0\0\0")
    link = 4  # where the previous IFD's "next IFD" offset goes
    for tags, data, tiled in pages:
        data_at = len(out)
        out += data + b"\0" * (len(data) % 2)
        entries = {BITS: 8, COMPRESSION: DEFLATE, PHOTOMETRIC: 1, SAMPLES: 1, **tags}
        if tiled:
            entries |= {TILE_OFFSETS: data_at, TILE_BYTES: len(data)}
        else:
            entries |= {STRIP_OFFSETS: data_at, STRIP_BYTES: len(data)}
            entries.setdefault(ROWS_PER_STRIP, entries[LENGTH])
        struct.pack_into("<I", out, link, len(out))
        out += struct.pack("<H", len(entries))
        for tag in sorted(entries):
            out += struct.pack("<HHII", tag, 4, 1, entries[tag])  # LONG, one value
        link = len(out)
        out += b"\0\0\0\0"
    return bytes(out)


def tiff_page(image: Image.Image) -> tuple[dict[int, int], bytes, bool]:
    grey = image.convert("L")
    return {WIDTH: grey.width, LENGTH: grey.height}, zlib.compress(grey.tobytes(), 9), False


def tiff_bomb() -> bytes:
    """One 100000 x 100000 strip of deflated zeros, cut short: a few hundred bytes."""
    return tiff([({WIDTH: 100_000, LENGTH: 100_000}, zlib.compress(b"\0" * 100_000), False)])


def tiff_huge_second_page(picture: Image.Image) -> bytes:
    """A sane first page (the digit), then a second page declaring 100000 x 100000."""
    huge = ({WIDTH: 100_000, LENGTH: 100_000}, zlib.compress(b"\0" * 100_000), False)
    return tiff([tiff_page(picture), huge])


def tiff_huge_tiles(picture: Image.Image) -> bytes:
    """A 112 x 112 page stored in one 65536 x 65536 tile (4 GB once inflated): the canvas is
    sane, the decoder's tile buffer is not. The tile holds the digit's rows, then stops."""
    grey = picture.convert("L")
    side = 65536
    rows = b"".join(row.tobytes() + b"\0" * (side - grey.width) for row in np.asarray(grey))
    tags = {WIDTH: grey.width, LENGTH: grey.height, TILE_WIDTH: side, TILE_LENGTH: side}
    return tiff([(tags, zlib.compress(rows, 9), True)])


def icns(kind: bytes, frame: bytes) -> bytes:
    """An Apple icon file with one entry (e.g. ic10: a 1024 x 1024 PNG or JPEG 2000 slot)."""
    entry = kind + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def icon_directory(kind: int, frame: bytes) -> bytes:
    """A Windows icon (kind 1) or cursor (kind 2) directory with one 16 x 16 entry."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, kind, 1) + entry + frame


def jpeg2000(picture: Image.Image, fmt: str) -> bytes:
    """`fmt` "j2k" is a bare codestream, "jp2" the boxed file format."""
    return png_bytes(picture, "JPEG2000", no_jp2=fmt == "j2k", irreversible=False)


def jpeg2000_huge(picture: Image.Image) -> bytes:
    """A real JP2 whose header box and codestream (SIZ) declare a 60000 x 60000 canvas in
    60000 x 60000 tiles; the data is the 112 x 112 picture's."""
    data = bytearray(jpeg2000(picture, "jp2"))
    ihdr = data.index(b"ihdr") + 4
    struct.pack_into(">II", data, ihdr, 60000, 60000)  # height, width
    siz = data.index(b"\xff\x51") + 6  # marker(2) Lsiz(2) Rsiz(2)
    # Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz
    struct.pack_into(">IIIIII", data, siz, 60000, 60000, 0, 0, 60000, 60000)
    return bytes(data)


def psd(picture: Image.Image) -> bytes:
    """A minimal Photoshop file: one grey 8-bit channel, raw image data."""
    grey = picture.convert("L")
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"", 1, grey.height, grey.width, 8, 1)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers: empty
    return header + sections + struct.pack(">H", 0) + grey.tobytes()


def mpo(first: Image.Image, second: Image.Image) -> bytes:
    """A multi-picture JPEG as phone cameras write them: the first frame is an ordinary JPEG."""
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], quality=95)
    return out.getvalue()


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


# --- requests ---------------------------------------------------------------------------------


def http_request(
    method: str,
    target: str,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    content_type: str = "application/json",
) -> bytes:
    """One raw HTTP/1.1 request that asks the server to close the connection after it."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if body or method == "POST":
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def v2_infer(body: bytes | str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return http_request("POST", f"/v2/models/{MODEL}/infer", data, headers)


def v2_image(image: bytes, outputs: list[dict[str, Any]] | None = None) -> str:
    """A V2 request for one base64 image, with the `outputs` given."""
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1],
              "data": [base64.b64encode(image).decode()]}  # fmt: skip
    return json.dumps({"inputs": [tensor], **({"outputs": outputs} if outputs else {})})


def v2_classification(image: bytes, k: str) -> str:
    """`k` is pasted as JSON text, so it can be a string, an object, a list or a number."""
    request = json.loads(v2_image(image))
    request["outputs"] = [{"name": "probabilities", "parameters": {"classification": "K"}}]
    return json.dumps(request).replace('"K"', k)


def v2_fp32(data: str, shape: str = "[1,1,28,28]") -> str:
    """An FP32 tensor whose data and shape are pasted as JSON text."""
    return (
        '{"inputs":[{"name":"input","datatype":"FP32","shape":' + shape + ',"data":' + data + "}]}"
    )


def header_flood(count: int, size: int) -> bytes:
    """`count` headers of `size` bytes each on a harmless GET."""
    flood = [(f"X-Flood-{i}", "a" * size) for i in range(count)]
    return http_request("GET", "/health/live", headers=flood)


def bytes_flood_binary(elements: int) -> bytes:
    """V2 binary extension: one BYTES tensor of `elements` zero-length elements after the JSON."""
    binary = b"\0\0\0\0" * elements
    tensor = {"name": "image", "datatype": "BYTES", "shape": [elements],
              "parameters": {"binary_data_size": len(binary)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]})
    return http_request(
        "POST",
        f"/v2/models/{MODEL}/infer",
        header.encode() + binary,
        [("Inference-Header-Content-Length", str(len(header)))],
        content_type="application/octet-stream",
    )


# --- the corpus -------------------------------------------------------------------------------


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
    label = digits[0].label

    def upload(
        name: str, content_type: str, status: int, fragment: str = "", **extra: Any
    ) -> dict[str, Any]:
        return {"name": name, "kind": "upload", "content_type": content_type, "status": status,
                "detail": fragment, **extra}  # fmt: skip

    def http(name: str, status: int | str, fragment: str = "") -> dict[str, Any]:
        return {"name": name, "kind": "http", "status": status, "detail": fragment}

    bomb = "decompression bomb"

    def refused(fmt: str) -> str:
        """CONVSERVE_FORMATS refuses it: the detail names the format and the allowed ones."""
        return (
            f"looks like {fmt} (by its first bytes), a format this server does not decode; "
            "allowed formats: JPEG, PNG, GIF, WEBP, BMP, TIFF"
        )

    images = [
        (upload("empty", "image/png", 400, "no image data"), b""),
        (upload("truncated-jpeg", "image/jpeg", 400, "truncated"), jpeg[: len(jpeg) // 2]),
        (upload("truncated-png", "image/png", 400, "truncated"), png[: len(png) // 2]),
        (upload("random-bytes", "image/jpeg", 400, "cannot identify"), rng.bytes(4096)),
        (upload("text-as-png", "image/png", 400, "cannot identify"), b"just some text\n" * 20),
        (upload("html-as-jpeg", "image/jpeg", 400, "cannot identify"),
         b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        (upload("json-as-png", "image/png", 400, "cannot identify"), b'{"image": "not really"}'),
        (upload("one-by-100000", "image/png", 200), png_bytes(wide)),
        (upload("svg", "image/svg+xml", 415, "vector format"), SVG),
        (upload("svg-as-png", "image/png", 400, "cannot identify"), SVG),
        (upload("pdf", "application/pdf", 415, "not accepted"), minimal_pdf()),
        (upload("pdf-as-png", "image/png", 400, "cannot identify"), minimal_pdf()),
        (upload("animated-50-frames", "image/gif", 200, label=label), animated.getvalue()),
        (upload("cmyk-jpeg", "image/jpeg", 200, label=label), formats["jpeg-cmyk"][1]),
        (upload("png-16bit", "image/png", 200, label=label), formats["png-16bit"][1]),
        (upload("png-palette", "image/png", 200, label=label), formats["png-palette"][1]),
        (upload("png-alpha", "image/png", 200, label=label), formats["png-alpha"][1]),
        (upload("exif-rotated", "image/jpeg", 200, label=label), formats["jpeg-exif-rotated"][1]),
        (upload("multipart-empty-part", f"multipart/form-data; boundary={boundary}", 400,
                "file 2 (b.png): no image data"),
         multipart([("file", "a.png", good), ("file", "b.png", b"")], boundary)),
        (upload("multipart-300-parts", f"multipart/form-data; boundary={boundary}", 413,
                "the limit is 256 images"),
         multipart([("file", f"{i}.png", b"x") for i in range(300)], boundary)),
        (upload("multipart-wrong-boundary", "multipart/form-data; boundary=not-the-one", 400,
                "malformed multipart"),
         multipart([("file", "a.png", good)], boundary)),
        (upload("multipart-no-boundary", "multipart/form-data", 400, "without a boundary"),
         multipart([("file", "a.png", good)], boundary)),
        (upload("multipart-no-file-part", f"multipart/form-data; boundary={boundary}", 400,
                "no `file` part"),
         multipart([("note", None, b"hello")], boundary)),
        # tiny files declaring huge canvases, one per allowed format (and per WebP bitstream)
        (upload("png-bomb", "image/png", 400, bomb), png_bomb(100_000, 100_000)),
        (upload("gif-bomb", "image/gif", 400, bomb), gif_bomb()),
        (upload("jpeg-bomb", "image/jpeg", 400, bomb), jpeg_bomb(jpeg)),
        (upload("webp-vp8-bomb", "image/webp", 400, bomb), webp_vp8_bomb(picture)),
        (upload("webp-vp8l-bomb", "image/webp", 400, bomb), webp_vp8l_bomb(picture)),
        (upload("webp-vp8x-bomb", "image/webp", 400, bomb), webp_vp8x_bomb(picture)),
        (upload("bmp-bomb", "image/bmp", 400, bomb), bmp_bomb()),
        (upload("tiff-bomb", "image/tiff", 400, bomb), tiff_bomb()),
        # containers with embedded frames
        (upload("icns-huge-png", "image/x-icns", 415, refused("ICNS")),
         icns(b"ic10", png_bomb(65535, 65535))),
        (upload("icns-huge-jpeg2000", "image/x-icns", 415, refused("ICNS")),
         icns(b"ic10", jpeg2000_huge(picture))),
        (upload("ico-huge-png", "image/x-icon", 415, refused("ICO")),
         icon_directory(1, png_bomb(65535, 65535))),
        (upload("cur-huge-png", "image/x-icon", 415, refused("CUR")),
         icon_directory(2, png_bomb(65535, 65535))),
        (upload("mpo", "image/jpeg", 200, label=label), mpo(picture, digit_picture(digits[1]))),
        (upload("tiff-huge-second-page", "image/tiff", 200, label=label),
         tiff_huge_second_page(picture)),
        (upload("tiff-huge-tiles", "image/tiff", 400, "corrupt or truncated"),
         tiff_huge_tiles(picture)),
        (upload("dds", "image/vnd-ms.dds", 415, refused("DDS")), png_bytes(picture, "DDS")),
        (upload("psd", "image/vnd.adobe.photoshop", 415, refused("PSD")), psd(picture)),
        (upload("jpeg2000", "image/jp2", 415, refused("JPEG2000")), jpeg2000(picture, "j2k")),
        (upload("jpeg2000-huge-canvas", "image/jp2", 415, refused("JPEG2000")),
         jpeg2000_huge(picture)),
        # slow but legal: just under CONVSERVE_MAX_PIXELS, 16 bits a sample
        (upload("png-16bit-40mp", "image/png", 200, label=label, heavy=True),
         png_16bit_largest_legal(digits[0])),
    ]  # fmt: skip
    image = png_bytes(digits[0].image)
    integer = "parameter 'classification' must be an integer >= 1"
    scalar = "parameter values are strings, numbers or booleans"

    def classification(k: str) -> bytes:
        return v2_infer(v2_classification(image, k))

    def no_version(version: str) -> str:
        return f"no version or alias '{version}'; versions are numbers of at most 9 ASCII digits"

    requests = [
        (http("header-1mb", 431, "header fields may total"), header_flood(1, 1024 * 1024)),
        (http("headers-10000", 431, "header fields in one request"), header_flood(10_000, 8)),
        (http("request-line-16kb", 414, "the request line"),
         http_request("GET", "/health/live?q=" + "a" * 16_500)),
        (http("v2-outputs-amplified", 400, "requested 20000 times"),
         v2_infer(v2_image(image, [{"name": "probabilities"}] * 20_000))),
        (http("v2-bytes-flood-json", 413, "the limit is 256"),
         v2_infer('{"inputs":[{"name":"image","datatype":"BYTES","shape":[1000000],"data":['
                  + ",".join(['""'] * 1_000_000) + "]}]}")),
        (http("v2-bytes-flood-binary", 413, "the limit is 256"), bytes_flood_binary(1_000_000)),
        (http("json-nested-1000", 400, "JSON nested deeper than"),
         v2_infer(v2_fp32("[" * 1000 + "]" * 1000))),
        (http("v2-classification-string", 400, integer), classification('"abc"')),
        (http("v2-classification-object", 400, scalar), classification("{}")),
        (http("v2-classification-list", 400, scalar), classification("[1]")),
        (http("v2-classification-negative", 400, integer), classification("-3")),
        (http("v2-fp32-1e400", 400, "Number out of range"),
         v2_infer(v2_fp32("[1e400" + ",0" * 783 + "]"))),
        (http("v2-fp32-1e400-integer", 400, "Number out of range"),
         v2_infer(v2_fp32("[1" + "0" * 400 + ",0" * 783 + "]"))),
        (http("v2-fp32-negative-shape", 400, "every dimension must be"),
         v2_infer(v2_fp32("[" + ",".join(["0"] * 784) + "]", "[-5,1,28,28]"))),
        (http("v2-version-superscript-two", 404, no_version("²")),
         http_request("GET", f"/v2/models/{MODEL}/versions/%C2%B2/ready")),
        (http("v2-version-circled-one", 404, no_version("①")),
         v2_infer_at("%E2%91%A0", v2_image(image))),
        (http("predict-version-superscript-two", 404, no_version("²")),
         http_request("POST", "/predict?version=%C2%B2", image, content_type="image/png")),
    ]  # fmt: skip
    return images + requests


def v2_infer_at(version: str, body: str) -> bytes:
    return http_request("POST", f"/v2/models/{MODEL}/versions/{version}/infer", body.encode())


def file_name(entry: dict[str, Any]) -> str:
    suffix = ".heavy" if entry.get("heavy") else {"upload": ".bin", "http": ".http"}[entry["kind"]]
    return f"{entry['name']}{suffix}"


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for stale in HERE.iterdir():
        stale.unlink()
    manifest = []
    for entry, data in cases():
        entry["file"] = file_name(entry)
        (HERE / entry["file"]).write_bytes(data)
        manifest.append(entry)
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} cases to {HERE}")


if __name__ == "__main__":
    main()
