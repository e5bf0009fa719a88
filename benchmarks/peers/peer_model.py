"""The model every peer app serves: convserve's weights and preprocessing, plain torch.

Runs inside a peer venv (where `service` is an editable install of this repository). Loading
goes through `service.network.load_classifier` (hash, architecture and a dry run checked),
preprocessing through `service.imaging.prepare_image`; the forward pass is the classifier's
module on the stacked batch under `torch.inference_mode()`, then softmax and the top 5.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import Settings
from service.imaging import DecodeLimits, configure_decoding, prepare_image
from service.network import load_classifier

TOP_K = 5


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every peer app takes (benchmarks/peers.py passes it)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--run-dir", type=Path, default=None)
    return parser.parse_args(argv)


def say(text: str) -> None:
    """One line in the peer's log (its stdout)."""
    sys.stdout.write(f"convserve-peer {text}\n")
    sys.stdout.flush()


class Events:
    """Lines benchmarks/peers.py reads (threads=, batch=): the file named by PEER_EVENTS.

    A file of its own, so the peer's logging settings (TorchServe logs worker output only at
    INFO) neither hide these lines nor need to stay verbose to show them.
    """

    def __init__(self) -> None:
        path = os.environ.get("PEER_EVENTS")
        self.sink = Path(path).open("a", buffering=1) if path else sys.stdout  # noqa: SIM115

    def write(self, text: str) -> None:
        self.sink.write(f"convserve-peer {text}\n")
        self.sink.flush()


class PeerModel:
    """One store version folder on the CPU, with convserve's preprocessing."""

    def __init__(self, model_dir: str | Path, threads: int, warm_batch: int = 32) -> None:
        self.events = Events()
        torch.set_num_threads(threads)
        folder = Path(model_dir)
        self.classifier = load_classifier(
            folder, folder.parent.name, int(folder.name), torch.device("cpu")
        )
        self.module = self.classifier.module
        self.spec = self.classifier.spec.input
        self.labels = self.classifier.labels
        self.limits = DecodeLimits.from_settings(Settings())
        configure_decoding(self.limits.max_pixels)  # as convserve's runtime does
        self.threads = torch.get_num_threads()
        example = np.zeros((self.spec.channels, self.spec.height, self.spec.width), np.float32)
        for size in sorted({1, warm_batch}):  # convserve warms up its batch sizes too
            self.forward([example] * size)
        self.events.write(f"threads={self.threads} pid={os.getpid()} model={folder}")

    def prepare(self, data: bytes) -> np.ndarray:
        """Raw image bytes -> (C, H, W) float32, exactly as convserve prepares them."""
        return prepare_image(data, self.spec, self.limits).array

    def forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(arrays))
        with torch.inference_mode():
            logits = self.module(batch)
            return torch.softmax(logits.float(), dim=1).numpy()

    def predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        """One answer per image: top-5 classes, the batch size and the thread count."""
        probabilities = self.forward(arrays)
        size = len(arrays)
        self.events.write(f"batch={size}")
        k = min(TOP_K, len(self.labels))
        answers = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            predictions = [
                {"label": self.labels[i], "class_index": int(i), "probability": float(row[i])}
                for i in order
            ]
            answers.append({"predictions": predictions, "batch_size": size,
                            "threads": self.threads})  # fmt: skip
        return answers
