"""Imported model files as networks: a stored ONNX graph turned into a torch module.

`convserve import model.onnx|model.pt|model.pt2` (service.import_file) normalizes every format
to one ONNX graph that takes NCHW float32 and gives raw logits or log-probabilities. The
version stores that graph as its model.onnx (what ONNX Runtime runs) and the weights of its
torch twin, built here with onnx2torch, as weights.safetensors (what torch runs, and what
Grad-CAM and the layer maps hook into: its convolutions are real `nn.Conv2d` modules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import ArchitectureError
from service.spec import sha256_file

GRAPH_ARCHITECTURE = "graph"
ONNX2TORCH_OPSET = 17  # the newest opset onnx2torch converts every common op at


class Looped(nn.Module):
    """A graph that only runs one image at a time, run once per image of a batch."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.graph(batch[i : i + 1]) for i in range(batch.shape[0])])


def convert_graph(model: Any) -> nn.Module:
    """An onnx ModelProto as a torch module; ArchitectureError naming the op that has no
    converter, or the converter's own reason."""
    from onnx2torch import convert  # only where an imported file is built

    try:
        module: nn.Module = convert(model)
    except (NotImplementedError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ArchitectureError(f"onnx2torch cannot convert this graph: {exc}") from None
    return module.eval()


def build_graph(folder: Path, arguments: dict[str, Any]) -> nn.Module:
    """The torch module of an imported version, from its stored graph (hash checked)."""
    import onnx

    from service.engines import ONNX_FILE

    path = folder / ONNX_FILE
    if not path.is_file():
        raise ArchitectureError(f"an imported version needs its graph {ONNX_FILE}: it is missing")
    recorded = str(arguments.get("graph_sha256", ""))
    digest = sha256_file(path)
    if digest != recorded:
        raise ArchitectureError(
            f"{ONNX_FILE} has sha256 {digest[:12]}... but model.json records "
            f"{recorded[:12]}...: the file was changed or corrupted"
        )
    module = convert_graph(onnx.load(str(path)))
    return Looped(module) if arguments.get("batch") == "loop" else module


def applies_softmax(arguments: dict[str, Any]) -> bool:
    """Whether an imported graph ends in (log-)softmax: its outputs are log-probabilities,
    which convserve's own softmax turns back into the same probabilities."""
    return str(arguments.get("output", "logits")) != "logits"
