"""torch, ONNX Runtime and OpenVINO side by side, in one process, on the same ONNX file.

For resnet18, mobilenet_v3_small and the seed SmallCNN (random init: speed does not depend
on the weights), each engine runs the forward pass, softmax and top-5 at batch 1, 8 and 32,
timed as the in-process limit is (benchmarks.common.median_seconds). Each engine is first
checked against torch (largest logit difference on seeded batches), as loading checks it.
A fourth column is the same ONNX file quantized to INT8 (service.quantize, calibrated on
scikit-image's sample photos) on ONNX Runtime: its speed, not its answers (the weights are
random; tests/test_quantize.py measures agreement on a trained network).
Writes benchmarks/results/engines.{json,md}.

    python -m benchmarks.engines
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image

from benchmarks.common import forward, markdown_table, median_seconds, write_results
from service.engines import ENGINES, Engine, OnnxEngine, check_agreement, make_engine
from service.importing import import_own, import_torchvision
from service.quantize import quantize_int8
from service.spec import InputSpec
from service.store import ModelStore
from service.torch_engine import ensure_onnx

MODELS = ("resnet18", "mobilenet_v3_small", "seed")
SIZES = (1, 8, 32)


def store_model(root: Path, name: str) -> ModelStore:
    store = ModelStore(root / name)
    if name == "seed":
        import_own(store, "small_cnn", name, weights=None, input_shape=(3, 32, 32), classes=10)
    else:
        import_torchvision(store, name, name, weights=None)
    return store


class Int8(OnnxEngine):
    name = "onnxruntime int8"


def int8(path: Path, spec: InputSpec, folder: Path) -> Engine:
    """The ONNX file quantized on the sample photos, run by ONNX Runtime."""
    from skimage import data

    photos = folder / "photos"
    photos.mkdir(parents=True)
    samples = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
    for index, name in enumerate(samples):
        picture = Image.fromarray(getattr(data, name)())
        for turn in range(4):  # four views of each: 20 images, 16 calibrate
            picture.rotate(90 * turn, expand=True).save(photos / f"{index}-{turn}.png")
    quantized = quantize_int8(onnx.load(str(path)), spec, photos, None, 8)
    target = folder / "int8.onnx"
    onnx.save(quantized.model, str(target))
    return Int8(target, None)


def measure(name: str, root: Path, seconds: float) -> list[dict[str, Any]]:
    store = store_model(root, name)
    classifier = store.load(name, 1, torch.device("cpu"))
    folder = store.path(name, 1)
    path = ensure_onnx(classifier.module, classifier.input_shape, folder,
                       classifier.spec.sha256, root / "cache")  # fmt: skip
    engines: list[Engine] = [classifier.torch_engine]
    engines += [make_engine(engine, path, None) for engine in ENGINES]
    engines.append(int8(path, classifier.spec.input, root / f"{name}-int8"))
    rng = np.random.default_rng(0)
    rows = []
    for engine in engines:
        difference = check_agreement(engine, classifier.torch_engine, classifier.input_shape)
        for size in SIZES:
            arrays = list(rng.standard_normal((size, *classifier.input_shape)).astype(np.float32))
            median = median_seconds(partial(forward, engine, arrays), seconds)
            row = {"model": name, "engine": engine.name, "batch": size, "batch_ms": median * 1e3,
                   "images_per_s": size / median, "difference": difference}  # fmt: skip
            rows.append(row)
            rate, batch_ms = row["images_per_s"], row["batch_ms"]
            print(f"  {name} {engine.name} batch {size}: {rate:.1f} img/s, {batch_ms:.2f} "
                  f"ms/batch (max |diff| {difference:.1e})", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """One line per model and batch size: each engine's images/s, the fastest float engine (what
    `auto` would pick), and what INT8 adds to it."""
    engines = list(dict.fromkeys(row["engine"] for row in rows))
    floats = [engine for engine in engines if "int8" not in engine]
    lines = []
    for name in dict.fromkeys(row["model"] for row in rows):
        for size in SIZES:
            rate = {r["engine"]: r["images_per_s"] for r in rows
                    if r["model"] == name and r["batch"] == size}  # fmt: skip
            best = max(floats, key=lambda engine: rate[engine])
            lines.append([name, str(size), *(f"{rate[e]:.1f}" for e in engines), best,
                          f"{rate[best] / rate['torch']:.2f}x",
                          f"{rate[Int8.name] / rate[best]:.2f}x"])  # fmt: skip
    header = ["model", "batch", *(f"{e} img/s" for e in engines), "fastest float",
              "vs torch", "int8 vs fastest"]  # fmt: skip
    return markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed per engine and size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convserve-engines-") as folder:
        rows = [row for name in MODELS for row in measure(name, Path(folder), args.seconds)]
    threads = torch.get_num_threads()
    differences = markdown_table(
        ["model", "engine", "max logit difference from torch"],
        [[r["model"], r["engine"], f"{r['difference']:.1e}"] for r in rows if r["batch"] == 1],
    )
    text = table(rows) + "\n\n" + differences
    path = write_results("engines", {"threads": threads, "rows": rows}, text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
