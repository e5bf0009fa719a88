"""Decoding under Pillow's bomb guard and the format allowlist, and cheap wide-mode conversion:
hostile containers get their 4xx quickly over HTTP and the service keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import FORMATS, Settings, SettingsError
from service.imaging import BAND_PIXELS, DecodeLimits, configure_decoding, prepare_image, to_visible
from service.spec import InputSpec
from tests.conftest import ready_client
from tests.support import digit_picture, held_out_digits, png_bytes, running_server

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}
QUICK_S = 3.0  # a refusal reads headers only; generous for a shared, busy CI machine
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


# ---- hostile files, built here byte by byte ---------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """An 8-bit grey PNG header claiming width x height, with one compressed row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", row)
        + png_chunk(b"IEND", b"")
    )


def png_sixteen_bit(width: int, height: int) -> bytes:
    """A 16-bit grey PNG whose rows are one full-range ramp: tiny on disk, `width x height`
    pixels to decode and convert."""
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // (width - 1)).astype(">u2")
    row = b"\0" + ramp.tobytes()
    packer = zlib.compressobj(6)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


def ico_wrapping(frame: bytes, side: int = 16) -> bytes:
    """An ICO whose directory declares side x side and whose one frame is `frame`."""
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(frame), 6 + 16)
    return directory + entry + frame


def j2k_declaring(width: int, height: int) -> bytes:
    """A JPEG 2000 codestream of 16x16 pixels whose SIZ marker claims width x height."""
    out = io.BytesIO()
    Image.new("L", (16, 16), 128).save(out, "JPEG2000", no_jp2=True)
    data = bytearray(out.getvalue())
    assert data[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ: Xsiz and Ysiz follow Lsiz and Rsiz
    struct.pack_into(">II", data, 8, width, height)
    return bytes(data)


def icns_wrapping(frame: bytes) -> bytes:
    """An Apple icon with one 512x512 slot ("ic09") holding `frame`, as the attacker's did."""
    block = b"ic09" + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


def tiff_pages(pages: list[tuple[int, int, bytes]]) -> bytes:
    """A little-endian TIFF, one uncompressed 8-bit grey strip per (width, height, pixels)."""
    out = bytearray(b"II*\0\0\0\0\0")
    link = 4  # where the offset of the next IFD goes
    for width, height, pixels in pages:
        strip = len(out)
        out += pixels + b"\0" * (len(pixels) % 2)
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
                (273, 4, strip), (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]  # fmt: skip
        struct.pack_into("<I", out, link, len(out))
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        link = len(out)
        out += b"\0\0\0\0"
    return bytes(out)


def mpo_second_declaring(first: Image.Image, width: int, height: int) -> bytes:
    """A two-frame MPO (a stereo camera JPEG) whose second frame's SOF0 claims width x height."""
    data = bytearray(png_bytes(first, "MPO", save_all=True, append_images=[first], quality=95))
    second = data.index(b"\xff\xc0", data.index(b"\xff\xc0") + 2)
    struct.pack_into(">HH", data, second + 5, height, width)
    return bytes(data)


# ---- helpers ---------------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert "Traceback" not in body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


async def timed_post(client: httpx.AsyncClient, body: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post("/predict", content=body, headers=PNG)
    return response, time.monotonic() - started


async def still_serves(client: httpx.AsyncClient) -> None:
    digit = held_out_digits(1)[0]
    response = await client.post("/predict", content=png_bytes(digit.image), headers=PNG)
    assert response.status_code == 200
    assert response.json()["results"][0]["predictions"][0]["class_index"] == digit.label


def top_class(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["results"][0]["predictions"][0]["class_index"])


# ---- settings --------------------------------------------------------------------------------


def test_formats_setting_is_checked_against_pillow() -> None:
    assert Settings().formats == FORMATS == ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    assert Settings.from_env({"CONVSERVE_FORMATS": "png, ico"}).formats == ("PNG", "ICO")
    named = r"CONVSERVE_FORMATS='JPG,PNG' \(--formats\): JPG: not a format"  # variable and flag
    with pytest.raises(SettingsError, match=named):
        Settings.from_env({"CONVSERVE_FORMATS": "JPG,PNG"})
    with pytest.raises(SettingsError, match="at least one"):
        Settings.from_env({"CONVSERVE_FORMATS": " , "})


def test_the_guard_cannot_be_switched_off() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="positive"):
        configure_decoding(0)
    assert before == Image.MAX_IMAGE_PIXELS


# ---- the allowlist ---------------------------------------------------------------------------


async def test_other_formats_get_415_naming_the_format_and_the_allowlist(
    client: httpx.AsyncClient,
) -> None:
    digit = digit_picture(held_out_digits(1)[0])
    others = {
        "ICO": png_bytes(digit, "ICO", sizes=[(112, 112)]),
        "ICNS": icns_wrapping(j2k_declaring(60_000, 60_000)),  # the attacker's file, in kind
        "JPEG2000": j2k_declaring(60_000, 60_000),
        "PSD": b"8BPS\0\1" + b"\0" * 64,
        "QOI": png_bytes(digit, "QOI"),
    }
    for name, body in others.items():
        response, took = await timed_post(client, body)
        problem = assert_problem(
            response,
            415,
            f"the image looks like {name}",
            "allowed formats: JPEG, PNG, GIF, WEBP, BMP, TIFF",
        )
        assert problem["title"] == "Unsupported image format"
        assert took < QUICK_S, (name, took)
    # TGA has no signature of its own (Pillow never reads it unless allowed): what its first
    # bytes resemble is named, and it is refused all the same
    response, _ = await timed_post(client, png_bytes(digit, "TGA"))
    assert_problem(response, 415, "looks like CUR", "allowed formats: JPEG, PNG")
    response, _ = await timed_post(client, b"just some text\n" * 20)
    assert_problem(response, 400, "cannot identify an image in the 300 bytes sent")
    # V2 BYTES elements take the same decode path, and the same answer
    element = base64.b64encode(others["ICO"]).decode()
    infer = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [element]}]}
    response = await client.post("/v2/models/digits/infer", json=infer)
    assert_problem(response, 415, "element 0: the image looks like ICO")
    await still_serves(client)


# ---- Pillow's guard on embedded frames -------------------------------------------------------


async def test_bombs_inside_containers_are_refused_before_decoding() -> None:
    settings = Settings.from_env({"CONVSERVE_FORMATS": "PNG,ICO,ICNS,JPEG2000"})
    assert settings.max_pixels == 40_000_000  # 7000 x 7000 below is in Pillow's warning band
    digit = held_out_digits(1)[0]
    async with ready_client(settings) as client:
        # the decoder children set Pillow's guard at start (service.decoder) and run under
        # the decode ceiling: safe to send
        hostile = {  # body -> what the detail must say
            ico_wrapping(png_declaring(65_535, 65_535)): "ICO image declares 4,294,836,225",
            ico_wrapping(png_declaring(7_000, 7_000)): "ICO image declares 49,000,000",
            icns_wrapping(j2k_declaring(60_000, 60_000)): "embedded frame declares 3,600,000,000",
            icns_wrapping(j2k_declaring(7_000, 7_000)): "embedded frame declares 49,000,000",
            j2k_declaring(60_000, 60_000): "JPEG2000 image declares 3,600,000,000",
        }
        for body, fragment in hostile.items():
            response, took = await timed_post(client, body)
            problem = assert_problem(
                response, 400, fragment, "limit 40,000,000", "decompression bomb"
            )
            assert problem["title"] == "Decompression bomb"
            assert took < QUICK_S, (fragment, took)
        # the same formats, well formed, are decoded now that they are allowed
        icon = png_bytes(digit_picture(digit), "ICO", sizes=[(112, 112)])
        assert top_class(await client.post("/predict", content=icon, headers=PNG)) == digit.label
        jpeg = png_bytes(digit_picture(digit), "JPEG")
        assert_problem((await timed_post(client, jpeg))[0], 415, "JPEG", "PNG, ICO, ICNS, JPEG2000")
        await still_serves(client)


async def test_pages_and_frames_after_the_first_are_never_decoded(
    client: httpx.AsyncClient,
) -> None:
    digit = held_out_digits(1)[0]
    pages = [(28, 28, digit.image.tobytes()), (65_535, 65_535, b"\0" * 16)]
    response, took = await timed_post(client, tiff_pages(pages))
    assert top_class(response) == digit.label
    assert took < QUICK_S
    # JPEG hands a camera's multi-picture file to the MPO plugin: its first frame is a JPEG
    response, took = await timed_post(
        client, mpo_second_declaring(digit_picture(digit), 60_000, 60_000)
    )
    assert top_class(response) == digit.label
    assert took < QUICK_S
    await still_serves(client)


def test_a_real_server_turns_the_warning_band_into_an_error(tmp_path: Path) -> None:
    """Outside pytest no filter makes warnings errors: the server's own configure_decoding must
    (an ICO frame of 49 MP is between 1x and 2x the limit: Pillow alone would only warn)."""
    with running_server(
        tmp_path,
        {"CONVSERVE_FORMATS": "PNG,ICO", "CONVSERVE_MODELS": "digits", "CONVSERVE_WARMUP": "0"},
    ) as server:
        for side, pixels in ((7_000, "49,000,000"), (65_535, "4,294,836,225")):
            body = ico_wrapping(png_declaring(side, side))
            response = httpx.post(f"{server.url}/predict", content=body, headers=PNG, timeout=10)
            assert_problem(response, 400, f"ICO image declares {pixels}", "decompression bomb")
        digit = held_out_digits(1)[0]
        response = httpx.post(
            f"{server.url}/predict", content=png_bytes(digit.image), headers=PNG, timeout=10
        )
        assert top_class(response) == digit.label
        assert "Traceback" not in server.output()


# ---- cheap 16-bit conversion -----------------------------------------------------------------


async def test_a_16_bit_40_megapixel_png_classifies(client: httpx.AsyncClient) -> None:
    body = png_sixteen_bit(8_000, 5_000)  # exactly the default 40 MP limit
    assert len(body) < 1_000_000
    response, took = await timed_post(client, body)
    assert response.status_code == 200, response.text
    assert took < 10.0  # was 1-2 s of float64 alone; now about 0.5 s in all
    await still_serves(client)


def float64_reference(image: Image.Image) -> np.ndarray:
    """The conversion as it was (whole-image float64), to hold the banded one to."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(array.min()), float(array.max())
        scale = 1.0 if high <= 1.0 and low >= 0.0 else 1.0 / max(high - low, 1e-12)
        array = (array - (0.0 if scale == 1.0 else low)) * scale * 255.0
    elif image.mode in SIXTEEN_BIT or array.max() > 255:
        array = array * (255.0 / 65535.0)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def test_wide_modes_scale_to_8_bits_as_before() -> None:
    rng = np.random.default_rng(3)
    every = np.arange(65_536, dtype=np.uint16).reshape(256, 256)
    banded = rng.integers(0, 65_536, size=(1_000, 1_500), dtype=np.uint16)  # two bands
    assert banded.size > BAND_PIXELS
    images = [
        Image.fromarray(every),
        Image.fromarray(banded),
        Image.frombytes("I;16B", (256, 256), every.astype(">u2").tobytes()),
        Image.fromarray(rng.integers(-1_000, 70_000, size=(64, 80), dtype=np.int32)),
        Image.fromarray(rng.integers(-50, 256, size=(64, 80), dtype=np.int32)),
        Image.fromarray(rng.random((64, 80), dtype=np.float32)),
        Image.fromarray((rng.random((64, 80)) * 3_000 - 500).astype(np.float32)),
        Image.fromarray(np.full((8, 8), 7.0, dtype=np.float32)),
    ]
    assert [i.mode for i in images] == ["I;16", "I;16", "I;16B", "I", "I", "F", "F", "F"]
    for image in images:
        visible = to_visible(image)
        assert visible.mode == "L"
        np.testing.assert_array_equal(np.asarray(visible), float64_reference(image), image.mode)


@pytest.mark.parametrize(
    ("mode", "size"), [("I;16", (8_000, 5_000)), ("I;16", (8_000_000, 1)), ("F", (4_000, 2_500))]
)
def test_wide_modes_convert_without_a_whole_image_copy(mode: str, size: tuple[int, int]) -> None:
    width, height = size
    row = np.linspace(0, 65_535 if mode == "I;16" else 2.5, width)
    dtype = np.uint16 if mode == "I;16" else np.float32
    image = Image.frombytes(mode, size, np.tile(row.astype(dtype), height).tobytes())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        visible = to_visible(image)
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert visible.mode == "L"
    assert visible.getextrema() == (0, 255)
    # a float64 copy of the image alone would be 8 bytes a pixel (320 MB at 40 MP)
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MB of numpy temporaries"
    assert took < 3.0  # about 0.2 s at 40 MP; the float64 version took 1-2 s


def test_transparency_flattens_onto_white_as_alpha_composite_did() -> None:
    value, alpha = np.meshgrid(np.arange(256), np.arange(256))
    pixels = np.dstack([value, 255 - value, value // 2, alpha]).astype(np.uint8)
    rgba = Image.fromarray(pixels)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    for image in (rgba, rgba.convert("LA"), rgba.convert("RGBa")):
        reference = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        np.testing.assert_array_equal(np.asarray(to_visible(image)), np.asarray(reference))


def test_grey_for_an_rgb_network_is_resized_before_it_becomes_rgb() -> None:
    """The shortcut must not change a pixel: compare with the same picture sent as RGB."""
    spec = InputSpec(channels=3, height=224, width=224, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225], resize="center_crop", resize_size=256)  # fmt: skip
    noise = np.random.default_rng(5).integers(0, 256, size=(1_100, 1_500), dtype=np.uint8)
    grey = Image.fromarray(noise)
    limits = DecodeLimits(10**7)
    for keep_display in (False, True):
        shortcut = prepare_image(png_bytes(grey), spec, limits, keep_display=keep_display)
        reference = prepare_image(
            png_bytes(grey.convert("RGB")), spec, limits, keep_display=keep_display
        )
        np.testing.assert_array_equal(shortcut.array, reference.array)
        assert shortcut.box == reference.box
        if keep_display:
            assert shortcut.display is not None
            assert reference.display is not None
            assert shortcut.display.mode == "RGB"
            np.testing.assert_array_equal(
                np.asarray(shortcut.display), np.asarray(reference.display)
            )
