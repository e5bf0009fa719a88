"""The torch side of a store version: building and verifying its network, Grad-CAM and
activation maps on it, and writing new versions.

Only what needs the live module imports this: a version prepared for ONNX Runtime serves
without it until a heatmap, the explorer or a fallback to torch first needs the network
(service.classifier builds it then).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.anatomy import describe, trace
from service.card import Anatomy, ReadPoint
from service.classifier import Classifier, Explanation
from service.config import Settings
from service.convolution import layer_maps_json
from service.decisions import Card, card_facts, remember_card
from service.engines import Engine
from service.errors import ArchitectureError, ModelLoadError
from service.graph_files import GRAPH_ARCHITECTURE, applies_softmax, load_graph_only
from service.graphs import Looped, build_graph
from service.heatmaps import activation_map, grad_cam, heatmap_layers
from service.prepared import compared_at, policy
from service.registry import build_model
from service.spec import SPEC_FILE, ModelSpec, check_name, encode_spec, sha256_file
from service.store import WEIGHTS_FILE, ModelStore, read_checked
from service.torch_engine import TorchEngine, select_engine, store_graph, write_onnx

log = logging.getLogger("convserve.store")


class Network:
    """A version's module on its device, with the torch engine that runs it."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.engine = TorchEngine(module, device)

    def to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack (C, H, W) arrays into one (N, C, H, W) tensor on the model's device."""
        batch = torch.from_numpy(np.stack(arrays))
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def explain(
        self,
        arrays: Sequence[np.ndarray],
        method: str,
        point: ReadPoint,
        targets: list[int | None],
    ) -> Explanation:
        """Probabilities plus one heatmap per image, from one batched forward pass."""
        if isinstance(self.module, Looped) and len(arrays) > 1:  # its layers run once per image
            parts = [
                self.explain([a], method, point, [t]) for a, t in zip(arrays, targets, strict=True)
            ]
            return Explanation(
                np.concatenate([p.probabilities for p in parts]),
                np.concatenate([p.grids for p in parts]),
                [c for p in parts for c in p.targets],
                point,
            )
        batch = self.to_batch(arrays)
        if method == "gradcam":
            logits, maps, chosen = grad_cam(self.module, batch, point, targets)
        else:
            logits, maps = activation_map(self.module, batch, point)
            chosen = logits.argmax(dim=1).tolist()
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return Explanation(probabilities, maps, chosen, point)

    def layer_maps_json(self, classifier: Classifier, array: np.ndarray, layer: str) -> bytes:
        """The explorer's view of conv layer `layer` for one image (service.convolution)."""
        return layer_maps_json(classifier, array, layer)


def use_threads(threads: int | None) -> None:
    """CONVSERVE_THREADS for torch's own thread pool (unset: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def _check_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"wrong shapes {', '.join(wrong[:5])}")
    if problems:
        raise ValueError("weights do not match the architecture: " + "; ".join(problems))


def _first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            return name, child
    return None


def _dry_run(module: nn.Module, spec: ModelSpec, device: torch.device) -> None:
    """Refuse a network whose outputs cannot be what model.json promises."""
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    first = _first_conv(module)
    if first is not None and first[1].in_channels != shape[0]:
        raise ValueError(
            f"input.channels is {shape[0]} but the network's first convolution ({first[0]}) "
            f"takes {first[1].in_channels}"
        )
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *shape), generator=generator).to(device)
    try:
        with torch.inference_mode():
            logits = module(probe).float()
    except RuntimeError as exc:
        raise ValueError(f"dry run on a {'x'.join(map(str, shape))} input failed: {exc}") from None
    classes = len(spec.labels)
    if tuple(logits.shape) != (2, classes):
        raise ValueError(
            f"dry run gives outputs of shape {list(logits.shape[1:])} per image but model.json "
            f"lists {classes} labels: expected [{classes}] raw logits"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("dry run produced NaN or infinite outputs")
    if spec.architecture == GRAPH_ARCHITECTURE and applies_softmax(spec.arguments):
        return  # recorded at import: its log-probabilities are softmaxed back to themselves
    ones = torch.ones(2, device=logits.device)
    if (logits >= 0).all() and torch.allclose(logits.sum(dim=1), ones, atol=1e-4):
        raise ValueError(
            "outputs already sum to 1: the network applies softmax itself; store it without the "
            "final softmax (convserve applies it once)"
        )
    if torch.allclose(logits.exp().sum(dim=1), ones, atol=1e-4):
        raise ValueError("outputs are log-probabilities (log_softmax); store raw logits")


def write_version(
    store: ModelStore,
    name: str,
    module: nn.Module | dict[str, torch.Tensor],
    spec: ModelSpec,
    graph: bytes | None = None,
) -> int:
    """Write the next version atomically: files go in a hidden folder that is renamed last.
    `module`: the network, or just its weights (an imported graph torch cannot run);
    `graph`: an imported file's normalized ONNX graph, stored as the version's model.onnx."""
    folder = store.root / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        weights = staging / WEIGHTS_FILE
        tensors = module.state_dict() if isinstance(module, nn.Module) else module
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(state, str(weights))
        spec = msgspec.structs.replace(spec, sha256=sha256_file(weights))
        shape = (spec.input.channels, spec.input.height, spec.input.width)
        if graph is not None:
            store_graph(graph, staging, spec.sha256)
        elif isinstance(module, nn.Module):
            try:  # the ONNX Runtime engine's file, exported now so loading need not
                write_onnx(module, shape, staging, spec.sha256)
            except Exception as exc:  # the torch engine serves without it
                log.warning("no ONNX export for %s: %s", name, exc)
        (staging / SPEC_FILE).write_bytes(encode_spec(spec))  # last: marks it complete
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)  # mkdtemp makes it private; served stores are read by others
        version = max(store.versions(name), default=0) + 1
        staging.rename(folder / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version


def load_module(folder: Path, spec: ModelSpec, device: torch.device) -> nn.Module:
    """Build the architecture, load and check its weights, and dry-run it on `device`."""
    weights = folder / WEIGHTS_FILE
    if spec.architecture == GRAPH_ARCHITECTURE:
        module = build_graph(folder, spec.arguments)
    else:
        module = build_model(spec.architecture, spec.arguments)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise ValueError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    _check_state(module, state)
    module.load_state_dict(state, strict=True)
    module.eval().requires_grad_(False).to(device)
    _dry_run(module, spec, device)
    return module


def examine(module: nn.Module, spec: ModelSpec) -> tuple[Anatomy, dict[str, ReadPoint]]:
    """The card's layer table and the heatmap layers, from one traced dry run."""
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    device = next(module.parameters()).device
    calls = trace(module, torch.zeros((1, *shape), device=device))
    layers = heatmap_layers(calls)
    if spec.heatmap_layer not in layers:
        raise ValueError(
            f"heatmap_layer {spec.heatmap_layer!r} is not a layer of the network; "
            f"valid: {', '.join(layers)}"
        )
    return describe(module, shape, calls), layers


def choose_engine(classifier: Classifier, folder: Path, settings: Settings) -> Engine:
    """The engine a version serves with (service.torch_engine.select_engine): what the loader
    runs, and what `convserve import` and `train` run so that the first start finds it decided.
    A version left on ONNX Runtime or OpenVINO gets its card recorded too: with both, the next
    start serves it without torch (service.prepared)."""
    spec = classifier.spec
    engine = select_engine(
        classifier.module, classifier.torch_engine, classifier.input_shape, folder,
        spec.sha256, settings.cache_dir, policy(spec, settings, classifier.device),
        settings.threads, compared_at(spec, settings),
    )  # fmt: skip
    if engine.name != classifier.torch_engine.name:
        facts = card_facts(spec.sha256, (folder / SPEC_FILE).read_bytes())
        layers = list(classifier.layers.values())
        remember_card(settings.cache_dir, Card(facts, classifier.anatomy, layers,
                                               classifier.warnings))  # fmt: skip
    return engine


def full_load(folder: Path, name: str, version: int, settings: Settings, device: str) -> Classifier:
    """Load a version with its network, and decide its engine (a graph torch cannot run has
    one: ONNX Runtime)."""
    classifier = load_classifier(folder, name, version, device, settings.threads)
    if classifier.has_network:
        classifier.engine = choose_engine(classifier, folder, settings)
    return classifier


def free_device_memory() -> None:
    """Give the CUDA allocator's cached blocks back once a version was retired."""
    torch.cuda.empty_cache()


def load_classifier(
    folder: Path, name: str, version: int, device: str | torch.device, threads: int | None = None
) -> Classifier:
    """Verify hash, architecture, keys/shapes, labels, input spec and a dry run, then load.
    A graph torch cannot run loads without a network (service.graph_files)."""
    device = str(device)
    use_threads(threads)
    graph_only = load_graph_only(folder, name, version, threads)
    if graph_only is not None:
        return graph_only
    spec, warnings = read_checked(folder, name, version)
    try:
        module = load_module(folder, spec, torch.device(device))
        anatomy, layers = examine(module, spec)
    except (ValueError, ArchitectureError) as exc:
        raise ModelLoadError(name, version, str(exc)) from None
    network = Network(module, torch.device(device))
    return Classifier(
        name, version, spec, device, anatomy, layers, warnings + anatomy.warnings, network
    )


def build_network(
    folder: Path, name: str, version: int, device: str, threads: int | None
) -> Network:
    """A prepared version's network, when first needed: verified as at a full load."""
    use_threads(threads)
    spec, _ = read_checked(folder, name, version)
    try:
        return Network(load_module(folder, spec, torch.device(device)), torch.device(device))
    except (ValueError, ArchitectureError) as exc:
        raise ModelLoadError(name, version, str(exc)) from None
