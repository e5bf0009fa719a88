"""Imported model files as networks: a stored ONNX graph turned into a torch module.

`convserve import model.onnx|model.pt|model.pt2` (service.import_file) normalizes every format
to one ONNX graph that takes NCHW float32 and gives raw logits or log-probabilities. The
version stores that graph as its model.onnx (what ONNX Runtime runs) and the weights of its
torch twin, built here with onnx2torch, as weights.safetensors (what torch runs, and what
Grad-CAM and the layer maps hook into: its convolutions are real `nn.Conv2d` modules).
A graph without a twin serves on ONNX Runtime alone (service.graph_files).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import ArchitectureError
from service.graph_files import verified_graph

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
        # its NotImplementedError names the op in a repr
        missing = re.search(r"operation_type='(\w+)', version=(\d+)", str(exc))
        if missing is not None:
            op, opset = missing.groups()
            raise ArchitectureError(
                f"onnx2torch has no converter for {op} (opset {opset})"
            ) from None
        raise ArchitectureError(f"onnx2torch cannot convert this graph: {exc}") from None
    return module.eval()


def build_graph(folder: Path, arguments: dict[str, Any]) -> nn.Module:
    """The torch module of an imported version, from its stored graph (hash checked)."""
    import onnx

    module = convert_graph(onnx.load(str(verified_graph(folder, arguments))))
    return Looped(module) if arguments.get("batch") == "loop" else module
