"""`make bench`: `convserve predict` over a folder of photos against the in-process limit.

    .venv/bin/python -m benchmarks.offline [--files 960] [--rounds 3]

resnet18 (random init, `convserve import`, which records the engine for this machine):
  1. the in-process limit: the engine the command serves on, forward + softmax + top-5 over
     pre-decoded arrays at the batch size the command's batcher forms (32): the cores doing
     nothing but the model. The same forward at batch 32 plus one image's decode + preprocess
     per image, in line, is also reported: the driver's in-process limit (benchmarks.driver);
  2. `convserve predict FOLDER` in its own process over N distinct 500x375 JPEGs (scikit-image
     photos, each cropped, flipped and tinted its own way), timed by its own summary line
     (first file taken to last row written: the pipeline) and as a whole (wall time with
     start-up: importing, loading, starting the decoders).
Rounds alternate the two, so a slow spell of the machine hits both. Writes
benchmarks/results/offline.json and offline.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import forward, markdown_table, median_seconds, write_results
from service.classifier import Classifier
from service.config import Settings
from service.imaging import DecodeLimits, prepare_image
from service.prepared import batch_size, load_prepared

ROOT = Path(__file__).resolve().parent.parent
SIZE = (500, 375)
SUMMARY = re.compile(r"in ([\d.]+) s \(([\d.]+) files/s\)")


def photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 500x375 JPEGs (quality 90, about 40 KB) in two sub-folders."""
    from skimage import data

    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]  # type: ignore[no-untyped-call]  # no annotations
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        picture = Image.fromarray(sources[index % len(sources)])
        width, height = picture.size
        scale = rng.uniform(0.6, 1.0)
        crop_w = min(width, round(height * scale * 4 / 3))
        crop_h = round(crop_w * 3 / 4)
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        picture = picture.crop((left, top, left + crop_w, top + crop_h)).resize(SIZE)
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tint = rng.uniform(0.85, 1.15, 3)
        pixels = np.clip(np.asarray(picture, np.float32) * tint, 0, 255).astype(np.uint8)
        path = folder / ("a" if index % 2 else "b") / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        written.append(path)
    return written


def environment(workdir: Path) -> dict[str, str]:
    """The store and cache of this run, for the command and for the limit alike."""
    return {
        "CONVSERVE_STORE": str(workdir / "store"),
        "CONVSERVE_CACHE_DIR": str(workdir / "cache"),
        "CONVSERVE_LOG_LEVEL": "warning",
    }


def convserve(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *map(str, args)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def served(settings: Settings) -> Classifier:
    """resnet18 v1 loaded as the command's loader loads it: prepared (ONNX Runtime, no torch)
    when this machine's recorded decision says so, else in full with the recorded engine."""
    folder = settings.store / "resnet18" / "1"
    classifier = load_prepared(folder, "resnet18", 1, settings, "cpu")
    if classifier is None:
        from service.network import full_load

        classifier = full_load(folder, "resnet18", 1, settings, "cpu")
    return classifier


def limits(classifier: Classifier, settings: Settings, pictures: list[Path]) -> dict[str, Any]:
    """Images/s of the forward alone on pre-decoded arrays, and with decoding in line."""
    size = batch_size(classifier.spec, settings)
    decode_limits = DecodeLimits.from_settings(settings)
    bodies = [path.read_bytes() for path in pictures[:size]]
    arrays = [prepare_image(body, classifier.spec.input, decode_limits).array for body in bodies]
    batch_s = median_seconds(partial(forward, classifier.engine, arrays))
    decode = partial(prepare_image, bodies[0], classifier.spec.input, decode_limits)
    decode_s = median_seconds(decode, seconds=1.0)
    return {
        "batch": size,
        "forward_images_per_s": size / batch_s,
        "decode_ms": decode_s * 1000,
        "inline_images_per_s": size / (batch_s + size * decode_s),
    }


def run_command(folder: Path, count: int, workdir: Path) -> dict[str, Any]:
    rows = workdir / "rows.csv"
    started = time.perf_counter()
    done = convserve("predict", folder, "--model", "resnet18", "-o", rows,
                     env=environment(workdir))  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"convserve predict exited {done.returncode}: {done.stderr[-2000:]}")
    summary = done.stderr.strip().splitlines()[-1]
    found = SUMMARY.search(summary)
    assert found is not None, summary
    assert len(rows.read_text().splitlines()) == count + 1, "a row per file, and the header"
    return {
        "wall_s": wall,
        "pipeline_s": float(found[1]),
        "pipeline_images_per_s": count / float(found[1]),
        "wall_images_per_s": count / wall,
        "summary": summary,
    }


def report(rounds: list[dict[str, Any]], files: int, engine: str) -> tuple[str, dict[str, Any]]:
    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    forward_limit, inline_limit = median("forward_images_per_s"), median("inline_images_per_s")
    pipeline, wall = median("pipeline_images_per_s"), median("wall_images_per_s")
    rows = [
        [str(i + 1), f"{r['forward_images_per_s']:.1f}", f"{r['inline_images_per_s']:.1f}",
         f"{r['pipeline_images_per_s']:.1f} ({r['pipeline_s']:.2f} s)",
         f"{r['wall_images_per_s']:.1f} ({r['wall_s']:.2f} s)",
         f"{r['pipeline_images_per_s'] / r['forward_images_per_s']:.2f}x"]
        for i, r in enumerate(rounds)
    ]  # fmt: skip
    rows.append(["median", f"{forward_limit:.1f}", f"{inline_limit:.1f}", f"{pipeline:.1f}",
                 f"{wall:.1f}", f"{pipeline / forward_limit:.2f}x"])  # fmt: skip
    header = ["round", "limit: forward only (img/s)", "limit: decode in line (img/s)",
              "predict: pipeline (img/s)", "predict: whole command (img/s)",
              "pipeline / forward-only limit"]  # fmt: skip
    verdict = pipeline >= 0.9 * forward_limit
    text = "\n".join([
        f"resnet18 on {engine}, batch {rounds[0]['batch']}, {files} JPEGs of 500x375; "
        f"decode + preprocess {median('decode_ms'):.2f} ms per image",
        "",
        markdown_table(header, rows),
        "",
        f"`convserve predict` pipeline: {pipeline:.1f} img/s = {pipeline / forward_limit:.2f}x the "
        f"forward-only limit ({forward_limit:.1f}), {pipeline / inline_limit:.2f}x the "
        f"decode-in-line limit ({inline_limit:.1f}); whole command {wall / forward_limit:.2f}x. "
        f">= 0.9x forward-only: {'met' if verdict else 'NOT met'}.",
    ])  # fmt: skip
    payload = {
        "model": "resnet18", "engine": engine, "files": files, "rounds": rounds,
        "median": {"forward_images_per_s": forward_limit, "inline_images_per_s": inline_limit,
                   "pipeline_images_per_s": pipeline, "wall_images_per_s": wall},
        "ratio_pipeline_to_forward": pipeline / forward_limit,
        "ratio_pipeline_to_inline": pipeline / inline_limit,
        "ratio_wall_to_forward": wall / forward_limit, "met": verdict,
    }  # fmt: skip
    return text, payload


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=960, help="photos in the folder")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = environment(workdir)
        imported = convserve("import", "resnet18", "--random-init", env=env)
        if imported.returncode != 0:
            raise RuntimeError(imported.stderr)
        print(imported.stdout.strip(), flush=True)
        pictures = photos(workdir / "photos", args.files)
        size = sum(p.stat().st_size for p in pictures) / len(pictures)
        print(f"{len(pictures)} photos, {size / 1024:.0f} KB each on average", flush=True)
        settings = Settings.from_env(env)
        classifier = served(settings)
        rounds: list[dict[str, Any]] = []
        for number in range(1, args.rounds + 1):
            measured = limits(classifier, settings, pictures)
            print(f"round {number}: limit {measured['forward_images_per_s']:.1f} img/s forward "
                  f"only, {measured['inline_images_per_s']:.1f} with decoding in line",
                  flush=True)  # fmt: skip
            measured |= run_command(workdir / "photos", len(pictures), workdir)
            print(f"round {number}: {measured['summary']}; wall {measured['wall_s']:.2f} s",
                  flush=True)  # fmt: skip
            rounds.append(measured)
        text, payload = report(rounds, len(pictures), classifier.engine.name)
    path = write_results("offline", payload, text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
