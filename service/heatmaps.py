"""Where the network looked: Grad-CAM and activation maps read through hooks on the live module."""

from __future__ import annotations

from types import TracebackType

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from service.anatomy import ACTIVATIONS, PASS_THROUGH, Call
from service.card import ReadPoint


def heatmap_layers(calls: list[Call]) -> dict[str, ReadPoint]:
    """Every layer a heatmap can be taken at, in execution order.

    Conv layers are read after the activation that follows them (skipping batch norm), as
    Grad-CAM defines its maps; blocks (resnet's layer4, mobilenet's features.12) are read as
    they are. Only modules called once per forward pass with a 4-D output qualify.
    """
    names = [c.name for c in calls]
    once = {n for n in names if names.count(n) == 1}
    points: dict[str, ReadPoint] = {}
    for position, call in enumerate(calls):
        if len(call.output_shape) != 4 or call.name not in once or not call.name:
            continue
        c, h, w = call.output_shape[1:]
        if isinstance(call.module, nn.Conv2d):
            read = call
            for later in calls[position + 1 :]:
                if not later.leaf or isinstance(later.module, PASS_THROUGH):
                    continue
                if isinstance(later.module, ACTIVATIONS) and later.input_shape == call.output_shape:
                    read = later
                break
            points[call.name] = ReadPoint(call.name, read.name, read.index, (c, h, w), "conv")
        elif not call.leaf and call.name.count(".") <= 1:
            points[call.name] = ReadPoint(call.name, call.name, 0, (c, h, w), "block")
    order = {name: i for i, name in enumerate(names)}
    return dict(sorted(points.items(), key=lambda item: order[item[1].module_name]))


class ActivationRecorder:
    """Owns one forward hook on one module call; removes it on exit, whatever happened.

    With `track_grad`, the recorded output becomes the start of the autograd graph, so a
    gradient can be taken with respect to it alone, with no graph kept for earlier layers.
    With `keep_input`, the tensor the module received is kept too (`received`), as the module
    left it: use it on modules that do not work in place, such as a convolution.
    """

    def __init__(
        self, model: nn.Module, point: ReadPoint, *, track_grad: bool, keep_input: bool = False
    ) -> None:
        self.module = model.get_submodule(point.module_name)
        self.point = point
        self.track_grad = track_grad
        self.keep_input = keep_input
        self.activation: torch.Tensor | None = None
        self.received: torch.Tensor | None = None
        self._calls = 0
        self._handle: RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> object:
        index, self._calls = self._calls, self._calls + 1
        if index != self.point.call_index or not isinstance(output, torch.Tensor):
            return None
        if self.keep_input and inputs and isinstance(inputs[0], torch.Tensor):
            self.received = inputs[0].detach().clone()
        if not self.track_grad:
            self.activation = output.detach().clone()
            return None
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf.clone()  # later in-place ops (ReLU(inplace=True)) act on the copy

    def __enter__(self) -> ActivationRecorder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def recorded(self) -> torch.Tensor:
        if self.activation is None:
            raise RuntimeError(f"layer {self.point.layer} did not run in the forward pass")
        return self.activation


def scale_unit(maps: np.ndarray) -> np.ndarray:
    """Min-max scale each (h, w) map of an (N, h, w) stack to 0..1; flat maps become zeros."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)[:, None, None]
    span = flat.max(axis=1)[:, None, None] - low
    scaled: np.ndarray = np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)
    return scaled.astype(np.float32, copy=False)


def grad_cam(
    model: nn.Module, batch: torch.Tensor, point: ReadPoint, targets: list[int | None]
) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """One forward and one gradient for the whole batch -> (logits, maps 0..1, target classes).

    The gradient of the target scores is taken with respect to the layer's activations only
    (autograd.grad), never through the weights.
    """
    with ActivationRecorder(model, point, track_grad=True) as recorder, torch.enable_grad():
        logits = model(batch)  # (N, classes)
        activations = recorder.recorded()  # (N, K, h, w)
        index = logits.detach().argmax(dim=1, keepdim=True)  # (N, 1)
        if any(t is not None for t in targets):
            chosen = [int(b) if t is None else t for t, b in zip(targets, index[:, 0], strict=True)]
            index = torch.tensor(chosen, device=logits.device)[:, None]
        (gradients,) = torch.autograd.grad(logits.gather(1, index).sum(), activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cams = (weights * activations.detach()).sum(dim=1).clamp_min_(0)  # (N, h, w)
    return logits.detach(), scale_unit(cams.float().cpu().numpy()), index[:, 0].tolist()


def activation_map(
    model: nn.Module, batch: torch.Tensor, point: ReadPoint
) -> tuple[torch.Tensor, np.ndarray]:
    """Mean activation over the layer's feature maps -> (logits, maps 0..1); no gradient."""
    with ActivationRecorder(model, point, track_grad=False) as recorder, torch.inference_mode():
        logits = model(batch)
        maps = recorder.recorded().mean(dim=1)  # (N, h, w)
    return logits, scale_unit(maps.float().cpu().numpy())
