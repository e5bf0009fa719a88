"""Command-line values checked as they are parsed: argparse types that say what was expected
(exit 2, before any work), and a help formatter that shows every default."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from service.spec import NAME_PATTERN


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32): grey or colour, positive sizes."""
    try:
        channels, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}") from None
    if channels not in (1, 3):
        raise argparse.ArgumentTypeError(
            f"{text!r} has {channels} channels; convserve feeds 1 (grey) or 3 (colour)"
        )
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"height and width must be positive, got {text!r}")
    return channels, height, width


def positive_int(text: str) -> int:
    """An argparse type: 1, 2, ..."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: 0, 1, ... (seeds, class indices)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def model_name(text: str) -> str:
    """An argparse type: a name the store takes, checked before any work is done for it."""
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model name: letters, digits, '_' and '-', at most 64, "
            "starting with a letter or digit"
        )
    return text


def existing_file(text: str) -> Path:
    """An argparse type: a file that is there (whether it reads is the command's to find)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file path whose folder exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name such as out.png")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {path.parent} does not exist")
    return path


def training_data(text: str) -> str | Path:
    """An argparse type: 'mnist', or a folder that is there."""
    if text == "mnist":
        return text
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(
            f"{text}: no such folder (give 'mnist' or a folder with one sub-folder per class)"
        )
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file; give a folder with one sub-folder per class"
        )
    return path


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default; where there is none to show (None, a switch's False) the
    help text says in words what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
