"""`make bench`: `convserve predict` over a folder of photos against the in-process limit.

    .venv/bin/python -m benchmarks.offline [--files 480] [--rounds 5]

resnet18 (random init, `convserve import`, which records the engine for this machine):
  1. the in-process limit as benchmarks.driver defines it for every target: decode +
     preprocess each image in line, then the engine the command serves on, forward + softmax +
     top-5 at the batch size the command's batcher forms (32), no HTTP. A stricter bound is
     also reported: the same forward over pre-decoded arrays, the cores doing nothing but the
     model;
  2. `convserve predict FOLDER` in its own process over N distinct 500x375 JPEGs (scikit-image
     photos, each cropped, flipped and tinted its own way), timed by its own summary line
     (first file taken to last row written: the pipeline) and as a whole (wall time with
     start-up: importing, loading, starting the decoders).
Also reported: how many cores the forward keeps busy, and the ceiling that leaves a pipeline
on this machine (each image's forward and decode CPU time spread over every core).
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
    run_batch = partial(forward, classifier.engine, arrays)
    batch_s = median_seconds(run_batch)
    decode = partial(prepare_image, bodies[0], classifier.spec.input, decode_limits)
    decode_s = median_seconds(decode, seconds=1.0)
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(5):  # how many cores the forward keeps busy (all of this process's threads)
        run_batch()
    busy = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
    cores = len(os.sched_getaffinity(0))
    # the most a pipeline can do: each image's forward and decode CPU time spread over every
    # core, and never faster than the forward alone
    per_image = max(batch_s / size, (batch_s / size * busy + decode_s) / cores)
    return {
        "batch": size,
        "forward_images_per_s": size / batch_s,
        "forward_cores": busy,
        "decode_ms": decode_s * 1000,
        "inline_images_per_s": size / (batch_s + size * decode_s),
        "ceiling_images_per_s": 1 / per_image,
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
    """The table, and the verdict on the median of each round's own ratio (a command run and
    the limits measured just before it: the machine's speed drifts between rounds). The target
    is 0.9x the in-process limit as benchmarks.driver defines it for every other target
    (decode + preprocess + forward + top-k, no HTTP); the forward-only bound is also given."""
    for r in rounds:
        r["ratio"] = r["pipeline_images_per_s"] / r["inline_images_per_s"]
        r["ratio_forward"] = r["pipeline_images_per_s"] / r["forward_images_per_s"]

    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    ratio, forward_ratio = median("ratio"), median("ratio_forward")
    columns = ["inline_images_per_s", "forward_images_per_s", "ceiling_images_per_s",
               "pipeline_images_per_s", "wall_images_per_s"]  # fmt: skip
    rows = [
        [str(i + 1), *(f"{r[key]:.1f}" for key in columns), f"{r['ratio']:.2f}x",
         f"{r['ratio_forward']:.2f}x"]
        for i, r in enumerate(rounds)
    ]  # fmt: skip
    rows.append(["median", *(f"{median(key):.1f}" for key in columns), f"{ratio:.2f}x",
                 f"{forward_ratio:.2f}x"])  # fmt: skip
    header = ["round", "in-process limit (decode + forward)", "forward only",
              "CPU-bound ceiling", "predict: pipeline", "predict: whole command",
              "pipeline / in-process limit", "pipeline / forward only"]  # fmt: skip
    verdict = ratio >= 0.9
    lowest, highest = min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)
    pipeline, ceiling = median("pipeline_images_per_s"), median("ceiling_images_per_s")
    text = "\n".join([
        f"resnet18 on {engine}, batch {rounds[0]['batch']}, {files} JPEGs of 500x375, "
        f"{len(os.sched_getaffinity(0))} cores; decode + preprocess "
        f"{median('decode_ms'):.2f} ms per image; the forward alone keeps "
        f"{median('forward_cores'):.2f} cores busy. Images/s:",
        "",
        markdown_table(header, rows),
        "",
        f"`convserve predict`: {ratio:.2f}x the in-process limit (median of the rounds; "
        f"{lowest:.2f}x to {highest:.2f}x), {forward_ratio:.2f}x the forward-only bound, "
        f"{pipeline / ceiling:.2f}x the CPU-bound ceiling. >= 0.9x the in-process limit: "
        f"{'met' if verdict else 'NOT met'}.",
    ])  # fmt: skip
    payload = {
        "model": "resnet18", "engine": engine, "files": files, "rounds": rounds,
        "median": {key: median(key) for key in [*columns, "decode_ms", "forward_cores"]},
        "ratio_pipeline_to_inprocess": ratio, "ratio_pipeline_to_forward": forward_ratio,
        "met": verdict,
    }  # fmt: skip
    return text, payload


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=480, help="photos in the folder")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
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
