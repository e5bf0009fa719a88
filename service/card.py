"""What a version's network looks like, as plain data: its layer table (the model card) and the
layers a heatmap can be read at.

No torch here: service.anatomy and service.heatmaps work these out from the live module once,
and service.prepared keeps them, so a prepared version serves without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """floor((W - K + 2P) / S) + 1, with dilation folded into the effective kernel size."""
    effective = dilation * (kernel - 1) + 1
    return (size - effective + 2 * padding) // stride + 1


def local_field_note(receptive_field: int | None, input_shape: list[int]) -> str | None:
    """The card's warning when the last convolution or pooling sees less than the image."""
    if receptive_field is None or receptive_field >= min(input_shape[1:]):
        return None
    return (
        f"the last convolution/pooling layer sees {receptive_field}x{receptive_field} pixels, "
        f"less than the {input_shape[1]}x{input_shape[2]} input: spatial features are local "
        "and only the fully connected layers combine them"
    )


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
