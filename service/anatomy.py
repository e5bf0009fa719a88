"""A network's arithmetic per layer: output shapes, parameters, multiply-adds, receptive field.

Everything is read from the live module during one dry run, so the table always describes the
network that actually serves, not a hand-written summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from service.card import Anatomy, LayerRow, conv_output_size, local_field_note

SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
PASS_THROUGH = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass(frozen=True)
class Call:
    """One module call seen during a dry run, in completion order."""

    name: str
    module: nn.Module
    index: int  # how many times this module ran before, within the same forward pass
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    leaf: bool
    input_id: int  # identity of the input tensor, unique within one trace
    output_id: int


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _shape(value: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(value.shape) if value is not None else ()


def trace(model: nn.Module, example: torch.Tensor) -> list[Call]:
    """Run `example` through `model` once and record every module call (hooks removed after).

    Calls are in completion order; the last one is the root module itself (name "").
    """
    calls: list[Call] = []
    counts: dict[str, int] = {}
    handles = []
    alive: list[object] = [example]  # keeps tensors referenced so their ids stay unique
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(
            module: nn.Module, inputs: tuple[object, ...], output: object, name: str = name
        ) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            leaf = next(module.children(), None) is None
            source = _first_tensor(inputs[0]) if inputs else None
            result = _first_tensor(output)
            alive.extend((source, result))
            calls.append(
                Call(
                    name,
                    module,
                    index,
                    _shape(source),
                    _shape(result),
                    leaf,
                    id(source),
                    id(result),
                )
            )

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            result = _first_tensor(model(example))
    finally:
        for handle in handles:
            handle.remove()
    # the root call comes last, as it completes last
    calls.append(
        Call("", model, 0, _shape(example), _shape(result), False, id(example), id(result))
    )
    return calls


def _two(value: int | tuple[int, ...] | str) -> list[int]:
    if isinstance(value, str):  # padding="same"/"valid"
        return [0, 0]
    if isinstance(value, int):
        return [value, value]
    return [int(v) for v in value][:2] if len(value) >= 2 else [int(value[0])] * 2


def _spatial_params(module: nn.Module) -> tuple[list[int], list[int], list[int], list[int]]:
    """kernel, stride, padding, dilation of a conv or pool layer."""
    kernel = _two(module.kernel_size)  # type: ignore[arg-type]
    stride = _two(module.stride or module.kernel_size)  # type: ignore[arg-type]
    padding = _two(module.padding)  # type: ignore[arg-type]
    dilation = _two(getattr(module, "dilation", 1))
    return kernel, stride, padding, dilation


def _formula(module: nn.Module, in_shape: tuple[int, ...]) -> list[int] | None:
    if not isinstance(module, SPATIAL) or len(in_shape) != 4:
        return None
    kernel, stride, padding, dilation = _spatial_params(module)
    if isinstance(module, nn.Conv2d) and module.padding == "same":
        return [module.out_channels, in_shape[2], in_shape[3]]
    sizes = []
    for axis in range(2):
        size = in_shape[2 + axis]
        if getattr(module, "ceil_mode", False):
            effective = dilation[axis] * (kernel[axis] - 1) + 1
            out = math.ceil((size - effective + 2 * padding[axis]) / stride[axis]) + 1
            if (out - 1) * stride[axis] >= size + padding[axis]:
                out -= 1
        else:
            out = conv_output_size(size, kernel[axis], stride[axis], padding[axis], dilation[axis])
        sizes.append(out)
    channels = module.out_channels if isinstance(module, nn.Conv2d) else in_shape[1]
    return [channels, *sizes]


def _macs(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(module, nn.Conv2d) and len(out_shape) == 4:
        kh, kw = _two(module.kernel_size)
        per_output = kh * kw * module.in_channels // module.groups
        return per_output * module.out_channels * out_shape[2] * out_shape[3]
    if isinstance(module, nn.Linear):
        positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        return module.in_features * module.out_features * positions
    return 0


class _Field:
    """Receptive field bookkeeping per tensor, so branches (resnet shortcuts) are not compounded."""

    def __init__(self, input_id: int, full: int) -> None:
        self.full = full
        self.state: dict[int, tuple[int, int]] = {input_id: (1, 1)}  # tensor id -> (rf, jump)

    def step(self, call: Call) -> int:
        # a tensor made by functional code (add, cat, flatten) takes the largest path seen so far
        rf, jump = self.state.get(call.input_id) or max(self.state.values())
        module = call.module
        if isinstance(module, SPATIAL):
            kernel, stride, _, dilation = _spatial_params(module)
            rf, jump = rf + (kernel[0] - 1) * dilation[0] * jump, jump * stride[0]
        elif isinstance(module, (*GLOBAL_POOLS, nn.Linear)):
            rf = max(rf, self.full)
        self.state[call.output_id] = (rf, jump)
        return rf


def describe(
    model: nn.Module, input_shape: tuple[int, int, int], traced: list[Call] | None = None
) -> Anatomy:
    """The per-layer table for `model` on one (C, H, W) input, checked against a real forward.

    `traced` is a trace() of the same model on one input of that shape, when one is at hand.
    """
    if traced is None:
        device = next(model.parameters()).device
        traced = trace(model, torch.zeros((1, *input_shape), device=device))
    calls = [c for c in traced if c.leaf]
    field_ = _Field(traced[-1].input_id, max(input_shape[1], input_shape[2]))
    last_spatial_rf: int | None = None
    rows: list[LayerRow] = []
    notes: list[str] = []
    for call in calls:
        module = call.module
        kernel = stride = padding = None
        rf = field_.step(call)
        if isinstance(module, SPATIAL):
            kernel, stride, padding, _ = _spatial_params(module)
            last_spatial_rf = rf
        formula = _formula(module, call.input_shape)
        out = list(call.output_shape[1:])
        if formula is not None and formula != out:
            notes.append(f"{call.name}: formula gives {formula} but the network produced {out}")
        rows.append(
            LayerRow(
                name=call.name if call.index == 0 else f"{call.name}#{call.index}",
                type=type(module).__name__,
                kernel=kernel,
                stride=stride,
                padding=padding,
                output_shape=out,
                formula_shape=formula,
                params=sum(p.numel() for p in module.parameters(recurse=False))
                if call.index == 0
                else 0,
                macs=_macs(module, call.output_shape),
                receptive_field=rf,
            )
        )
    note = local_field_note(last_spatial_rf, list(input_shape))
    if note is not None:
        notes.append(note)
    return Anatomy(
        input_shape=list(input_shape),
        output_shape=list(traced[-1].output_shape[1:]),
        rows=rows,
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=sum(row.macs for row in rows),
        receptive_field=last_spatial_rf,
        warnings=notes,
    )
