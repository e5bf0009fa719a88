"""Classifier: a network with its preprocessing and labels; turns batches into probabilities.

No HTTP and no asyncio here: the batcher calls these methods from its inference thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.anatomy import Anatomy
from service.engines import Engine, TorchEngine
from service.errors import LayerNotFoundError
from service.heatmaps import ReadPoint, activation_map, grad_cam
from service.spec import ModelSpec


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray  # (N, classes) float32, rows sum to 1
    grids: np.ndarray  # (N, h, w) float32 in 0..1
    targets: list[int]  # class each map explains
    point: ReadPoint


class Classifier:
    """One loaded model version: module on its device, input spec, labels, layer table."""

    def __init__(
        self,
        name: str,
        version: int,
        spec: ModelSpec,
        module: nn.Module,
        device: torch.device,
        anatomy: Anatomy,
        layers: dict[str, ReadPoint],
        warnings: list[str],
    ) -> None:
        self.name = name
        self.version = version
        self.spec = spec
        self.module = module
        self.device = device
        self.anatomy = anatomy
        self.layers = layers
        self.warnings = warnings
        self.torch_engine = TorchEngine(module, device)
        self.engine: Engine = self.torch_engine  # what plain predictions run on

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.spec.input
        return (spec.channels, spec.height, spec.width)

    def to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack (C, H, W) arrays into one (N, C, H, W) tensor on the model's device."""
        batch = torch.from_numpy(np.stack(arrays))
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def predict(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Softmax probabilities (N, classes), computed once over raw logits."""
        logits = self.engine.logits(np.stack(arrays))  # (N, classes)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities: np.ndarray = (shifted / shifted.sum(axis=1, keepdims=True)).astype(
            np.float32
        )
        return probabilities

    def read_point(self, layer: str | None) -> ReadPoint:
        name = layer or self.spec.heatmap_layer
        try:
            return self.layers[name]
        except KeyError:
            valid = ", ".join(self.layers)
            raise LayerNotFoundError(
                f"model {self.name} v{self.version} has no heatmap layer {name!r}; "
                f"valid layers: {valid}"
            ) from None

    def explain(
        self,
        arrays: Sequence[np.ndarray],
        method: str,
        layer: str | None,
        targets: list[int | None],
    ) -> Explanation:
        """Probabilities plus one heatmap per image, from one batched forward pass."""
        point = self.read_point(layer)
        batch = self.to_batch(arrays)
        if method == "gradcam":
            logits, maps, chosen = grad_cam(self.module, batch, point, targets)
        else:
            logits, maps = activation_map(self.module, batch, point)
            chosen = logits.argmax(dim=1).tolist()
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return Explanation(probabilities, maps, chosen, point)

    def release(self) -> None:
        """Drop the weights; called once the version no longer serves anything."""
        self.module = nn.Module()
        self.torch_engine = self.engine = TorchEngine(self.module, self.device)
        self.layers = {}

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each of `batch_sizes` once so the first real request pays no first-call cost."""
        example = np.zeros(self.input_shape, dtype=np.float32)
        for size in batch_sizes:
            self.predict([example] * size)
