"""Heatmap vs plain latency per batch size (goal: a Grad-CAM batch costs at most 2x a plain one).

    .venv/bin/python -m benchmarks.heatmaps [--models digits resnet18] [--batches 1 8 32]

Compares three ways to get a batch's answer: the plain inference-mode forward pass, our
Grad-CAM (gradient of the target scores with respect to the layer's activations only), and a
textbook Grad-CAM that runs a full backward pass through every weight.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import markdown_table, time_call, write_results
from service.classifier import Classifier
from service.heatmaps import ActivationRecorder
from service.importing import import_torchvision
from service.store import ModelStore

BUNDLED = Path(__file__).resolve().parent.parent / "model_store"


def full_backward_grad_cam(classifier: Classifier, arrays: list[np.ndarray]) -> None:
    """The naive way: weights require grad, loss.backward() through the whole network."""
    module = classifier.module
    point = classifier.read_point(None)
    module.requires_grad_(True)
    try:
        with ActivationRecorder(module, point, track_grad=False), torch.enable_grad():
            saved: list[torch.Tensor] = []
            handle = module.get_submodule(point.module_name).register_forward_hook(
                lambda m, i, o: o.retain_grad() or saved.append(o)  # type: ignore[func-returns-value]
            )
            try:
                logits = module(classifier.network.to_batch(arrays))
                logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
            finally:
                handle.remove()
        module.zero_grad(set_to_none=True)
    finally:
        module.requires_grad_(False)


def load(name: str, workdir: Path) -> Classifier:
    if name == "resnet18":
        store = ModelStore(workdir)
        import_torchvision(store, "resnet18", "resnet18", weights=None)
        return store.load("resnet18", 1, torch.device("cpu"))
    return ModelStore(BUNDLED).load(name, 1, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            classifier = load(name, Path(workdir))
            rng = np.random.default_rng(0)
            for size in args.batches:
                arrays = [rng.normal(size=classifier.input_shape).astype(np.float32)] * size
                repeats = 5 if name == "resnet18" else 300
                model, batch = classifier, arrays
                plain = time_call(lambda: model.predict(batch), repeats)  # noqa: B023 (run now)
                ours = time_call(
                    lambda: model.explain(batch, "gradcam", None, [None] * len(batch)),  # noqa: B023
                    repeats,
                )
                naive = time_call(lambda: full_backward_grad_cam(model, batch), repeats)  # noqa: B023
                ratio = ours["median_ms"] / plain["median_ms"]
                naive_ratio = naive["median_ms"] / plain["median_ms"]
                results.append(
                    {
                        "model": name,
                        "batch": size,
                        "plain": plain,
                        "gradcam": ours,
                        "full_backward": naive,
                        "ratio": ratio,
                        "naive_ratio": naive_ratio,
                    }
                )
                rows.append(
                    [
                        name,
                        str(size),
                        f"{plain['median_ms']:.2f}",
                        f"{ours['median_ms']:.2f}",
                        f"{ratio:.2f}x",
                        f"{naive['median_ms']:.2f}",
                        f"{naive_ratio:.2f}x",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["model", "batch", "plain ms", "Grad-CAM ms", "ratio", "full-backward ms", "ratio"], rows
    )
    path = write_results("heatmaps", {"results": results}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
