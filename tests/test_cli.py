"""The command line as a user meets it: every train/import/describe/explain command that
README.md and docs/ show, then wrong ones, each in its own `python -m service` process.
Exit 2 is a usage error (a value given is wrong), exit 1 failed work; never a traceback."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from service.cli import build_parser
from service.registry import build_model
from tests.support import BUNDLED_STORE, ROOT, model_files, rotated_digits, run_cli

COMMANDS = ("train", "import", "describe", "explain", "predict")
DOCUMENTED = re.compile(r"convserve (train|import|describe|explain)((?: +[^\s`#]+)*)")
DIGIT = ROOT / "docs" / "examples" / "digit-4.jpg"


def documented_commands() -> list[str]:
    """Every train/import/describe/explain line with arguments in README.md and docs/*.md."""
    found: dict[str, None] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in DOCUMENTED.finditer(page.read_text()):
            if match.group(2).strip():  # "`convserve train` writes..." names, does not run
                found[f"convserve {match.group(1)}{match.group(2)}"] = None
    return list(found)


def _pictures(folder: Path, classes: tuple[str, ...] = ("circle", "square")) -> Path:
    """A tiny ImageFolder: 8 colour pictures per class."""
    rng = np.random.default_rng(0)
    for kind in classes:
        (folder / kind).mkdir(parents=True)
        for index in range(8):
            image = Image.new("RGB", (40, 40), (20, 20, 20))
            x, y = (int(v) for v in rng.integers(12, 28, 2))
            box = (x - 8, y - 8, x + 8, y + 8)
            fill = tuple(int(v) for v in rng.integers(150, 255, 3))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=fill)
            image.save(folder / kind / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder holding what the documented commands name: DIR, ./shapes and photos/
    (pictures),
    resnet18.pth and lenet.pth (state dicts), docs/examples/digit-4.jpg."""
    root = tmp_path_factory.mktemp("user")
    _pictures(root / "DIR")
    _pictures(root / "shapes")
    torch.save(build_model("resnet18").state_dict(), root / "resnet18.pth")
    lenet = load_file(str(BUNDLED_STORE / "lenet5" / "1" / "weights.safetensors"))
    torch.save(lenet, root / "lenet.pth")
    (root / "docs" / "examples").mkdir(parents=True)
    shutil.copy(DIGIT, root / "docs" / "examples")
    model_files(root)
    shutil.copytree(root / "shapes", root / "photos")  # INT8 calibration images
    rotated_digits(root / "rotated", count=100)  # what --from digits fine-tunes on
    rotated_digits(root / "captured-labelled" / "digits", count=100)  # what /review writes
    shutil.copytree(BUNDLED_STORE / "digits", root / "served" / "digits")
    return root


def test_the_docs_show_these_commands() -> None:
    """A command added to the docs gets a run below (or this fails and says which)."""
    assert set(documented_commands()) == set(EXPECTED)


EXPECTED = {
    "convserve train --arch small_cnn --name digits": "held-out of a stratified sample of 200",
    "convserve train --arch lenet5 --name lenet5": "held-out of a stratified sample of 200",
    "convserve train --arch small_cnn --name shapes --data DIR --input 3x32x32": "held-out of 16",
    "convserve train --arch small_cnn --name shapes --data ./shapes --input 3x32x32": "of 16",
    "convserve train --from digits --data rotated": "on the same",
    "convserve train --from digits --data rotated --name digits-rotated": "on the same",
    "convserve train --from digits --data captured-labelled/digits": "on the same",
    "convserve import resnet18 --random-init": "wrote",
    "convserve import resnet18 --weights resnet18.pth": "wrote",
    "convserve import small_cnn --random-init --input 3x32x32 --classes 10": "wrote",
    "convserve import small_cnn --random-init --input 3x32x32": "wrote",
    "convserve import lenet5 --weights lenet.pth --input 1x28x28 --classes 10": "wrote",
    "convserve import model.onnx --name mobilenet --labels labels.txt": "rewritten to dynamic",
    "convserve import model.pt --name scripted --labels labels.json": "wrote",
    "convserve import model.pt2 --name exported --labels labels.txt": "wrote",
    "convserve import model.onnx --name mobilenet-int8 --quantize int8 --calibrate photos/": (
        "int8: top-1 agrees with the float graph"
    ),
    "convserve import keras.onnx --name keras --layout NHWC --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5": (
        "takes NHWC images"
    ),
    "convserve describe small_cnn --input 3x32x32 --classes 10": "total parameters: 545,098",
    "convserve describe --list": "resnet18",
    "convserve explain docs/examples/digit-4.jpg --model digits --layer conv1 -o out.png": (
        "top class '4'"
    ),
}


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_documented_command_runs(command: str, workdir: Path) -> None:
    """Each as written, in a folder holding what it names; training kept tiny, writes go to a
    scratch store and explain reads the bundled one."""
    args = command.split()[1:]
    store = workdir / "store"
    extras: dict[str, list[str | Path]] = {
        "train": ["--epochs", "1", "--limit", "200", "--store", store],
        "import": ["--store", store],
        "explain": ["--store", BUNDLED_STORE],
        "describe": [],
    }
    extra = extras[args[0]]
    if "--from" in args:  # a served version to start from: a copy of the bundled digits
        extra = ["--epochs", "1", "--store", workdir / "served"]
    result = run_cli(*args, *extra, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert EXPECTED[command] in result.stdout
    if args[0] in ("train", "import"):
        written = Path(result.stdout.split()[1].rstrip(":"))
        if not written.is_absolute():
            written = workdir / written
        assert (written / "model.json").is_file()
    if args[0] == "explain":
        with Image.open(workdir / "out.png") as picture:
            assert picture.format == "PNG"


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = commands.choices[name]
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag_and_shows_every_default(command: str, tmp_path: Path) -> None:
    folded = " ".join(run_cli(command, "--help", cwd=tmp_path).stdout.split())  # unwrapped
    for action in _subparser(command)._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in folded, (command, action.dest)
    if command != "describe":  # the settings it reads, with their defaults and variables
        assert "--store VALUE model store directory" in folded
        assert "(default: model_store; CONVSERVE_STORE)" in folded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--name", "x", "--data", "/nope"], "argument --data: /nope: no such folder"),
        (["train", "--name", "bad/name"], "argument --name: 'bad/name' is not a model name"),
        (
            ["train", "--name", "x", "--epochs", "0"],
            "--epochs: expected a positive integer, got '0'",
        ),
        (
            ["train", "--name", "x", "--batch-size", "-1"],
            "--batch-size: expected a positive integer",
        ),
        (["train", "--name", "x", "--lr", "0"], "--lr: expected a number above 0, got '0'"),
        (["train", "--name", "x", "--lr", "nan"], "--lr: expected a number above 0, got 'nan'"),
        (
            ["train", "--name", "x", "--holdout", "1"],
            "--holdout: expected a fraction between 0 and 1",
        ),
        (["train", "--name", "x", "--limit", "0"], "--limit: expected a positive integer, got '0'"),
        (["train", "--name", "x", "--seed", "-1"], "--seed: expected an integer 0 or more"),
        (["train", "--name", "x", "--input", "2x28x28"], "convserve feeds 1 (grey) or 3 (colour)"),
        (["train", "--name", "x", "--input", "3x0x28"], "height and width must be positive"),
        (["train", "--name", "x", "--input", "big"], "expected CxHxW such as 3x32x32, got 'big'"),
        (["train"], "the following arguments are required: --name"),
        (
            ["import", "resnet18", "--weights", "missing.pth"],
            "--weights: missing.pth: no such file",
        ),
        (
            ["import", "resnet18", "--random-init", "--classes", "0"],
            "--classes: expected a positive",
        ),
        (["import", "resnet18", "--random-init", "--name", "../up"], "'../up' is not a model name"),
        (["describe", "small_cnn", "--input", "3x32"], "expected CxHxW such as 3x32x32"),
        (["explain", "nope.jpg", "-o", "out.png"], "argument image: nope.jpg: no such file"),
        (["explain", DIGIT, "-o", "/nonexistent/out.png"], "folder /nonexistent does not exist"),
        (["explain", DIGIT, "--version", "0", "-o", "o.png"], "--version: expected a positive"),
        (["explain", DIGIT, "--method", "saliency", "-o", "o.png"], "invalid choice: 'saliency'"),
    ],
)
def test_usage_errors_stop_at_parsing(args: list[str | Path], message: str, tmp_path: Path) -> None:
    """Wrong values are refused by the parser, argparse-style, before torch is even imported."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert f"usage: convserve {args[0]}" in result.stderr


def _broken_store(root: Path) -> Path:
    """The bundled digits model with its weights file changed after model.json was written."""
    shutil.copytree(BUNDLED_STORE / "digits", root / "digits")
    weights = root / "digits" / "1" / "weights.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    return root


@pytest.fixture(scope="module")
def scene(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of things that are wrong: one class only, a picture that is not one, a file
    that is neither picture nor state dict, an empty store and one with a changed file."""
    root = tmp_path_factory.mktemp("wrong")
    _pictures(root / "one", ("circle",))
    _pictures(root / "broken", ("a", "b"))
    (root / "broken" / "a" / "bad.png").write_bytes(b"not a picture")
    (root / "afile").write_text("not a state dict, not a picture")
    (root / "empty").mkdir()
    _broken_store(root / "broken_store")
    shutil.copytree(workdir / "DIR", root / "DIR")
    shutil.copy(workdir / "lenet.pth", root)
    return root


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["train", "--name", "x", "--arch", "resnet18"], 2,
         "resnet18 takes 3-channel input, not 1x28x28: the MNIST sample is 1x28x28 grey digits; "
         "train small_cnn or lenet5 on it, or resnet18 on a folder of pictures "
         "(--data DIR --input 3x28x28)"),
        (["train", "--name", "x", "--arch", "resnet9000"], 2, "unknown architecture 'resnet9000'"),
        (["train", "--name", "x", "--input", "3x32x32"], 2,
         "--input 3x32x32 is for --data DIR: the MNIST sample is 1x28x28"),
        (["train", "--name", "x", "--limit", "5"], 2,
         "--limit 5 cannot hold one sample of each of the 10 classes: use --limit 10 or more"),
        (["train", "--name", "x", "--data", "one", "--input", "3x32x32"], 2,
         "has 1 class sub-folder(s); a classifier needs at least two"),
        (["train", "--name", "x", "--data", "DIR", "--arch", "lenet5", "--input", "3x8x8"], 2,
         "lenet5 cannot take 3x8x8: input 8x8 is too small: the output of conv2 collapses to 0x0; "
         "--input 3x32x32 fits"),
        (["train", "--name", "x", "--data", "broken"], 1, "cannot identify an image"),
        (["train", "--name", "x", "--epochs", "1", "--limit", "100", "--lr", "1e12"], 1,
         "the loss diverged (not finite) in epoch 1: lower --lr"),
        (["train", "--name", "x", "--store", "afile/store"], 2, "afile is a file"),
        (["import", "resnet18", "--random-init", "--input", "1x224x224"], 2,
         "resnet18 takes 3-channel input, not 1x224x224; --input 3x224x224 fits"),
        (["import", "resnet18", "--weights", "afile"], 1,
         "afile could not be read as a state dict by torch's tensors-only loader"),
        (["import", "lenet5", "--weights", "lenet.pth", "--input", "1x28x28", "--classes", "5"], 2,
         "size mismatch for fc3.weight"),
        (["import", "resnet9000", "--random-init"], 2, "unknown architecture 'resnet9000'"),
        (["import", "resnet18"], 2, "resnet18: an architecture needs --random-init or --weights"),
        (["describe", "alexnet", "--input", "3x32x32"], 2,
         "alexnet cannot take 3x32x32: Given input size: (256x1x1)"),
        (["describe", "resnet9000"], 2, "unknown architecture 'resnet9000'; valid: alexnet"),
        (["explain", DIGIT, "--model", "nope", "--store", BUNDLED_STORE, "-o", "o.png"], 2,
         f"model 'nope' is not in the store {BUNDLED_STORE}; models there: digits, lenet5"),
        (["explain", DIGIT, "--model", "digits", "--version", "9", "--store", BUNDLED_STORE,
          "-o", "o.png"], 2, "model 'digits' has no version 9; versions: 1"),
        (["explain", DIGIT, "--target", "10", "--store", BUNDLED_STORE, "-o", "o.png"], 2,
         "--target 10 is not a class of digits v1: its 10 classes are 0..9"),
        (["explain", DIGIT, "--layer", "fc1", "--store", BUNDLED_STORE, "-o", "o.png"], 2,
         "has no heatmap layer 'fc1'; valid layers: conv1, conv2"),
        (["explain", DIGIT, "--method", "activation", "--target", "3", "-o", "o.png"], 2,
         "--target explains one class with gradcam; activation maps take none"),
        (["explain", "afile", "--store", BUNDLED_STORE, "-o", "o.png"], 1,
         "afile: cannot identify an image"),
        (["explain", DIGIT, "--store", "empty", "-o", "o.png"], 2,
         "the store empty holds no models"),
        (["explain", DIGIT, "--store", "broken_store", "-o", "o.png"], 1,
         "model digits v1: weights.safetensors has sha256"),
    ],
)  # fmt: skip
def test_wrong_commands_say_why(
    args: list[str | Path], code: int, message: str, scene: Path
) -> None:
    """Values only the work can judge: exit 2 when one given is wrong, 1 when the work fails,
    and the message says what to do; nothing is written to the store."""
    if args[0] in ("train", "import") and "--store" not in args:
        args = [*args, "--store", "store"]
    result = run_cli(*args, cwd=scene)
    assert result.returncode == code, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (scene / "store").exists()
