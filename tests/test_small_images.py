"""Small images are decoded in the front worker itself: the same answers and errors as the
decoder processes give, and only images whose cost their header bounds (service.small_images).

Two real servers on the bundled store, the response cache off so every request decodes: the
whole service in one process (every image through a decoder process) and two front workers.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.small_images import MAX_BYTES, MAX_PIXELS
from tests.data.make_corpus import multipart
from tests.support import (
    ROOT,
    ServerProcess,
    digit_picture,
    encodings,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

PNG = {"content-type": "image/png"}
BOUNDARY = "convserve-small"
SMALL = {"jpeg", "jpeg-exif-rotated", "png", "png-grey", "octet-stream"}  # of encodings()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    base = {"CONVSERVE_CACHE_ENTRIES": "0", "CONVSERVE_LOG_LEVEL": "warning"}
    root = tmp_path_factory.mktemp("small")
    with (
        running_server(root, {**base, "CONVSERVE_WORKERS": "0"}) as single,
        running_server(root, {**base, "CONVSERVE_WORKERS": "2"}) as workers,
    ):
        yield {"single": single, "workers": workers}


def small_count(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "convserve_small_images_total", model="digits")


def predict(
    server: ServerProcess, body: bytes, headers: dict[str, str], query: str = ""
) -> httpx.Response:
    url = f"{server.url}/predict?top_k=10{query}"  # every class's probability
    return httpx.post(url, content=body, headers=headers, timeout=30)


def probabilities(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    rows = []
    for result in response.json()["results"]:
        ranked = sorted(result["predictions"], key=lambda p: p["class_index"])
        rows.append(np.array([p["probability"] for p in ranked]))
    return rows


def same_answer(servers: dict[str, ServerProcess], body: bytes, headers: dict[str, str]) -> None:
    """The two-worker server answers exactly as the one whose decoders did the work."""
    expected = probabilities(predict(servers["single"], body, headers))
    found = probabilities(predict(servers["workers"], body, headers))
    assert len(found) == len(expected)
    for row, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)


def text_heavy_png() -> bytes:
    """A 28x28 digit with a compressed text chunk of 512 KB (2 KB on the wire): within Pillow's
    limits, but inflated while the header is read, so for the decoders."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (512 * 1024), zip=True)
    return png_bytes(held_out_digits(1)[0].image, pnginfo=info)


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


@pytest.mark.parametrize("kind", sorted(encodings(Image.new("RGB", (8, 8)))))
def test_every_format_answers_as_the_decoders_do(
    servers: dict[str, ServerProcess], kind: str
) -> None:
    """The formats the service reads: small PNGs and baseline JPEGs in the worker, the rest
    (progressive or CMYK JPEG, 16-bit, alpha or palette PNG, GIF, WebP, BMP, TIFF) in a
    decoder, each with the answer the decoders give."""
    content_type, body = encodings(digit_picture(held_out_digits(3)[2]))[kind]
    before = small_count(servers["workers"])
    same_answer(servers, body, {"content-type": content_type})
    assert small_count(servers["workers"]) - before == (1 if kind in SMALL else 0)


@pytest.mark.parametrize(
    ("name", "body", "small"),
    [
        ("a 28x28 digit", png_bytes(held_out_digits(1)[0].image), True),
        ("the README's 280x280 JPEG", (ROOT / "docs/examples/digit-4.jpg").read_bytes(), True),
        ("a 300x300 PNG over the byte bound", noise_png(300), False),
        ("a PNG over the pixel bound", png_bytes(Image.new("L", (301, 300), 7)), False),
        ("a PNG with compressed text", text_heavy_png(), False),
    ],
)
def test_only_images_bounded_by_their_header_skip_the_decoders(
    servers: dict[str, ServerProcess], name: str, body: bytes, small: bool
) -> None:
    with Image.open(io.BytesIO(body)) as image:  # each case is what its name says
        within = len(body) <= MAX_BYTES and image.width * image.height <= MAX_PIXELS
    assert within or not small, name
    assert within or "bound" in name, name  # the text case is small: declined for its text
    before = small_count(servers["workers"])
    same_answer(servers, body, PNG)
    assert small_count(servers["workers"]) - before == (1 if small else 0), name


def test_a_heatmap_request_decodes_in_a_decoder(servers: dict[str, ServerProcess]) -> None:
    """A heatmap needs the display picture too: that stays with the decoders."""
    body = png_bytes(held_out_digits(1)[0].image)
    before = small_count(servers["workers"])
    response = predict(servers["workers"], body, PNG, "&heatmap=gradcam")
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["heatmap"]["png"]
    assert small_count(servers["workers"]) == before


def test_a_broken_small_image_gets_the_decoders_error(servers: dict[str, ServerProcess]) -> None:
    """The worker's own attempt fails quietly; the client gets the decoders' 400, word for word."""
    whole = png_bytes(held_out_digits(1)[0].image)
    broken = whole[:-40]  # IDAT cut short, IEND gone
    corrupt = bytearray(whole)
    idat = whole.index(b"IDAT") + 8
    corrupt[idat : idat + 8] = zlib.compress(b"")[:8]  # a wrong deflate stream, CRC unchanged
    for body in (broken, bytes(corrupt)):
        expected = predict(servers["single"], body, PNG)
        found = predict(servers["workers"], body, PNG)
        assert expected.status_code == found.status_code == 400, found.text
        assert found.headers["content-type"].startswith("application/problem+json")
        assert found.json()["detail"] == expected.json()["detail"]


def test_a_request_of_small_and_large_images_keeps_their_order(
    servers: dict[str, ServerProcess],
) -> None:
    digits = held_out_digits(4)
    parts: list[tuple[str, str | None, bytes]] = [
        ("file", "0.png", png_bytes(digits[0].image)),
        ("file", "1.png", noise_png(300)),
        ("file", "2.jpg", png_bytes(digit_picture(digits[2]), "JPEG", progressive=True)),
        ("file", "3.png", png_bytes(digits[3].image)),
    ]
    body = multipart(parts, BOUNDARY)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    before = small_count(servers["workers"])
    same_answer(servers, body, headers)
    assert small_count(servers["workers"]) - before == 2
    found = probabilities(predict(servers["workers"], body, headers))
    for index in (0, 3):
        assert int(np.argmax(found[index])) == digits[index].label


def test_a_small_image_past_the_pixel_limit_is_refused_as_before(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """CONVSERVE_MAX_PIXELS below the worker's own bound: the limit still holds, with the
    decoders' words."""
    env = {"CONVSERVE_WORKERS": "2", "CONVSERVE_MAX_PIXELS": "600"}
    with running_server(tmp_path_factory.mktemp("limit"), env) as server:
        response = predict(server, png_bytes(Image.new("L", (28, 28), 0)), PNG)
        assert response.status_code == 400, response.text
        assert "the limit is 600" in response.json()["detail"]
        out = io.BytesIO()
        Image.new("L", (20, 20), 0).save(out, "PNG")
        assert predict(server, out.getvalue(), PNG).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", b"<html><body>a page</body></html>"],
    ids=["pdf", "html"],
)
def test_bytes_no_allowed_format_accepts_are_refused_in_the_worker_as_by_the_decoders(
    servers: dict[str, ServerProcess], body: bytes
) -> None:
    """Refused from their first 16 bytes, without a decoder's turn, in the decoders' words,
    alone or as one part of several (labelled)."""
    digit = png_bytes(held_out_digits(1)[0].image)
    form = multipart([("file", "digit.png", digit), ("file", "other.bin", body)], BOUNDARY)
    multi = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    for content, headers in ((body, PNG), (form, multi)):
        expected = predict(servers["single"], content, headers)
        found = predict(servers["workers"], content, headers)
        assert found.status_code == expected.status_code, found.text
        assert found.status_code in {400, 415}
        assert found.json()["detail"] == expected.json()["detail"]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring a canvas, then a tiny IDAT: a bomb by its header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def gif_declaring(width: int, height: int) -> bytes:
    """A 1x1 GIF whose screen and frame declare `width` x `height`."""
    data = bytearray(png_bytes(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    frame = data.index(b",", 13)  # the image descriptor, after the palette
    data[frame + 5 : frame + 9] = struct.pack("<HH", width, height)
    return bytes(data)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("png bomb", png_declaring(60000, 60000)),
        ("png too large", png_declaring(9000, 9000)),
        ("gif bomb", gif_declaring(65535, 65535)),
        ("jpeg cut after its header", (ROOT / "docs/examples/digit-4.jpg").read_bytes()[:400]),
    ],
)
def test_refused_by_its_header_in_the_worker_as_by_the_decoders(
    servers: dict[str, ServerProcess], kind: str, body: bytes
) -> None:
    """A small file that its header condemns is answered by the worker, without a decoder's
    turn, with the decoders' own status and detail."""
    before = small_count(servers["workers"])
    expected = predict(servers["single"], body, PNG)
    found = predict(servers["workers"], body, PNG)
    assert expected.status_code in {400, 413, 415}, (kind, expected.text)
    assert (found.status_code, found.json()["detail"]) == (
        expected.status_code,
        expected.json()["detail"],
    ), kind
    assert small_count(servers["workers"]) == before
