"""What a version's network looks like, as plain data: its layer table (the model card) and the
layers a heatmap can be read at.

No torch here: service.anatomy and service.heatmaps work these out from the live module once,
and service.prepared keeps them, so a prepared version serves without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    kernel: list[int] | None
    stride: list[int] | None
    padding: list[int] | None
    output_shape: list[int]
    formula_shape: list[int] | None  # floor((W - K + 2P) / S) + 1, where it applies
    params: int
    macs: int
    receptive_field: int | None


@dataclass(frozen=True)
class Anatomy:
    input_shape: list[int]
    output_shape: list[int]
    rows: list[LayerRow]
    total_params: int
    total_macs: int
    receptive_field: int | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadPoint:
    """Which module call a heatmap layer is read from: a conv is read after its rectifier."""

    layer: str  # the name users ask for: conv1, layer4, features.12
    module_name: str  # the module whose output is read: relu1, layer4
    call_index: int
    shape: tuple[int, int, int]  # (C, h, w) of the maps
    kind: str  # "conv" or "block"
