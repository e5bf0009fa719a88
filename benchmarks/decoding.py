"""What decoding in child processes costs against the thread pool it replaced (no HTTP).

    .venv/bin/python -m benchmarks.decoding [--workers 2] [--images 400]

For each input (a digit PNG for the 1x28x28 models, a 640x480 and a 12-megapixel JPEG for a
3x224x224 network): the latency of one image decoded alone, and the throughput of many decoded
at once, three ways: inline (the floor), the thread pool convserve used before (N threads), and
the DecodePool (N decoder processes under the memory ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import markdown_table, time_call, write_results
from service.config import Settings
from service.decoder import DecoderConfig
from service.decoding import DecodePool
from service.imaging import DecodeLimits, configure_decoding, prepare_image
from service.spec import InputSpec, read_spec

BUNDLED = Path(__file__).resolve().parent.parent / "model_store"
IMAGENET = InputSpec(
    channels=3, height=224, width=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
    resize="center_crop", resize_size=256,
)  # fmt: skip


def photo(width: int, height: int) -> bytes:
    """A smooth synthetic photo (gradients and a little noise) as a quality-90 JPEG."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    channels = [np.sin(6 * x + 3 * y), np.cos(4 * x * y + 2 * y), x * y]
    pixels = np.dstack([(c - c.min()) / (np.ptp(c) or 1.0) for c in channels]) * 230
    pixels = pixels + rng.normal(0, 8, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def digit() -> bytes:
    ramp = np.linspace(0, 255, 28 * 28).reshape(28, 28).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, "PNG")
    return out.getvalue()


async def measure(
    name: str, body: bytes, spec: InputSpec, workers: int, images: int
) -> list[list[str]]:
    settings = Settings()
    limits = DecodeLimits.from_settings(settings)
    configure_decoding(limits.max_pixels)
    pool = DecodePool(
        workers, DecoderConfig(limits.max_pixels, limits.formats, settings.decode_memory_mb)
    )
    await pool.start()
    threads = ThreadPoolExecutor(workers)
    loop = asyncio.get_running_loop()
    count = max(images // (40 if len(body) > 1_000_000 else 1), 2 * workers)
    rows: list[list[str]] = []
    try:

        def inline() -> None:
            prepare_image(body, spec, limits)

        async def threaded(n: int) -> None:
            await asyncio.gather(
                *(loop.run_in_executor(threads, prepare_image, body, spec, limits)
                  for _ in range(n))
            )  # fmt: skip

        async def pooled(n: int) -> None:
            await asyncio.gather(
                *(pool.prepare([body], spec, time.monotonic() + 60) for _ in range(n))
            )

        alone = time_call(inline, repeats=min(count, 50))["median_ms"]
        ways = {"thread pool": threaded, "decoder processes": pooled}
        for way, run in ways.items():
            samples = []
            for _ in range(min(count, 50)):
                started = time.perf_counter()
                await run(1)
                samples.append((time.perf_counter() - started) * 1000)
            one = float(np.median(samples))
            started = time.perf_counter()
            await run(count)
            rate = count / (time.perf_counter() - started)
            rows.append(
                [name, way, f"{alone:.2f}", f"{one:.2f}", f"{one - alone:+.2f}", f"{rate:.0f}"]
            )
            print(" | ".join(rows[-1]), flush=True)
    finally:
        pool.close()
        threads.shutdown()
    return rows


async def run(workers: int, images: int) -> list[list[str]]:
    digits = read_spec(BUNDLED / "digits" / "1" / "model.json").input
    inputs = [
        ("digit PNG 28x28 -> 1x28x28", digit(), digits),
        ("JPEG 640x480 -> 3x224x224", photo(640, 480), IMAGENET),
        ("JPEG 4000x3000 -> 3x224x224", photo(4000, 3000), IMAGENET),
    ]
    rows: list[list[str]] = []
    for name, body, spec in inputs:
        rows += await measure(name, body, spec, workers, images)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=Settings().decode_threads)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    rows = asyncio.run(run(args.workers, args.images))
    header = ["input", "decoding in", "inline ms", "one image ms", "hop ms", "images/s"]
    table = markdown_table(header, rows)
    path = write_results("decoding", {"workers": args.workers, "rows": rows}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
