"""`convserve train --from NAME[:VERSION] --data DIR`: a served version, fine-tuned on labelled
images (the ImageFolder a review writes: one folder per label).

It starts from that version's weights and keeps its preprocessing (mean, std, resize, labels),
optionally with its convolutions frozen. Part of DIR is held out, and the old version and the
new one are measured on the same held-out images. The new version is written whatever the
result, with both accuracies in its model.json `metrics` (so on its card); a new version that
is worse says so loudly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
from torch import nn

from service.errors import ServiceError, UnreadableFileError
from service.graph_files import GRAPH_ARCHITECTURE
from service.imaging import prepare_image
from service.spec import ModelSpec, TrainingMetrics, now_iso
from service.store import ModelStore
from service.training import (
    LIMITS,
    TrainConfig,
    evaluate,
    fit,
    image_folder_classes,
    images_in,
    split,
)


@dataclass(frozen=True)
class Tuned:
    version: int
    before: float  # the version it started from, on the held-out images
    after: float
    held_out: int


def labelled(root: Path, spec: ModelSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    """DIR's pictures preprocessed as the version serves them, and their class indices in its
    label order; every folder must be one of its labels."""
    classes = image_folder_classes(root)
    unknown = [name for name in classes if name not in spec.labels]
    if unknown:
        shown = ", ".join(spec.labels[:12]) + (", ..." if len(spec.labels) > 12 else "")
        raise ValueError(
            f"{root}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a label of "
            f"{source} ({shown}); name each folder after one of its labels"
        )
    arrays, targets = [], []
    for name in classes:
        for path in images_in(root / name):
            try:
                arrays.append(prepare_image(path.read_bytes(), spec.input, LIMITS).array)
            except ServiceError as exc:
                raise UnreadableFileError(f"{path}: {exc.detail}") from None
            except OSError as exc:
                raise UnreadableFileError(f"{path}: {exc.strerror or exc}") from None
            targets.append(spec.labels.index(name))
    return np.stack(arrays), np.array(targets, dtype=np.int64)


def fine_tune(
    store: ModelStore,
    name: str,
    version: int,
    root: Path,
    config: TrainConfig,
    *,
    freeze_conv: bool = False,
    target: str | None = None,
    progress: bool = True,
) -> Tuned:
    """Fine-tune `name` v`version` on `root` and write the result as the next version of
    `target` (default: the same model)."""
    source = f"{name} v{version}"
    classifier = store.load(name, version, "cpu")
    spec = classifier.spec
    if spec.architecture == GRAPH_ARCHITECTURE:
        raise ValueError(
            f"{source} is an imported graph: fine-tuning starts from a registry architecture's "
            "weights (train or import one by name)"
        )
    images, targets = labelled(root, spec, source)
    train_idx, held_idx = split(len(targets), config.holdout, config.seed)
    x, y = torch.from_numpy(images), torch.from_numpy(targets)
    model = copy.deepcopy(classifier.module).cpu().requires_grad_(True)
    if freeze_conv:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.requires_grad_(False)
    held = (x[held_idx], y[held_idx])
    before = evaluate(model, *held)
    torch.manual_seed(config.seed)
    after = fit(model, (x[train_idx], y[train_idx]), held, config, progress, desc=source)
    metrics = TrainingMetrics(
        accuracy=round(after, 4),
        dataset=f"image folder {root.name}: {len(held_idx)} held-out of {len(targets)} "
        f"(seed {config.seed})",
        samples=len(held_idx),
        fine_tuned_from=f"{name}:{version}",
        baseline_accuracy=round(before, 4),
    )
    frozen = ", convolutions frozen" if freeze_conv else ""
    tuned = msgspec.structs.replace(
        spec, metrics=metrics, sha256="", created=now_iso(),
        description=f"{source} fine-tuned on {root.name} for {config.epochs} epochs{frozen} by "
        "`convserve train --from`",
    )  # fmt: skip
    written = store.write(target or name, model.eval(), tuned)
    return Tuned(written, before, after, len(held_idx))
