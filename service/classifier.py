"""Classifier: a network with its preprocessing and labels; turns batches into probabilities.

No HTTP, no asyncio and no torch here: the batcher calls these methods from its inference
thread, and a version prepared for ONNX Runtime (service.prepared) predicts without torch.
The torch side (service.network: the module, Grad-CAM, layer maps) is built on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.card import Anatomy, ReadPoint
from service.engines import Engine
from service.errors import LayerNotFoundError
from service.spec import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from service.network import Network


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray  # (N, classes) float32, rows sum to 1
    grids: np.ndarray  # (N, h, w) float32 in 0..1
    targets: list[int]  # class each map explains
    point: ReadPoint


def _released() -> Network:
    raise RuntimeError("this model version was unloaded")


class Classifier:
    """One loaded model version: input spec, labels, layer table, engine, and its network."""

    def __init__(
        self,
        name: str,
        version: int,
        spec: ModelSpec,
        device: str,
        anatomy: Anatomy,
        layers: dict[str, ReadPoint],
        warnings: list[str],
        network: Network | Callable[[], Network],
        engine: Engine | None = None,
    ) -> None:
        """`network`: the built one, or how to build it when first needed; `engine`: what
        predictions run on (default: the built network's torch engine)."""
        self.name = name
        self.version = version
        self.spec = spec
        self.device = device  # "cpu", "cuda", "cuda:1"
        self.anatomy = anatomy
        self.layers = layers
        self.warnings = warnings
        self._lock = threading.Lock()
        self._network: Network | None = None
        self._build: Callable[[], Network] = _released
        if callable(network):
            self._build = network
        else:
            self._network = network
        if engine is None:
            engine = self.network.engine
        self.engine: Engine = engine

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.spec.input
        return (spec.channels, spec.height, spec.width)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def has_network(self) -> bool:
        return self._network is not None

    @property
    def network(self) -> Network:
        """The torch side, built (importing torch) by the first caller; later callers wait."""
        with self._lock:
            if self._network is None:
                self._network = self._build()
            return self._network

    @property
    def module(self) -> nn.Module:
        return self.network.module

    @property
    def torch_engine(self) -> Engine:
        return self.network.engine

    @property
    def conv_layers(self) -> dict[str, ReadPoint]:
        """The heatmap layers that are convolutions, in execution order."""
        return {name: p for name, p in self.layers.items() if p.kind == "conv"}

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
        return self.network.explain(arrays, method, self.read_point(layer), targets)

    def layer_maps_json(self, array: np.ndarray, layer: str) -> bytes:
        """The explorer's view of conv layer `layer` for one image (service.convolution)."""
        return self.network.layer_maps_json(self, array, layer)

    def release(self) -> None:
        """Drop the weights; called once the version no longer serves anything."""
        with self._lock:
            self._network = None
            self._build = _released
        self.engine = UNLOADED
        self.layers = {}

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each of `batch_sizes` once so the first real request pays no first-call cost."""
        example = np.zeros(self.input_shape, dtype=np.float32)
        for size in batch_sizes:
            self.predict([example] * size)


class _Unloaded:
    name = "none"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("this model version was unloaded")


UNLOADED: Engine = _Unloaded()
