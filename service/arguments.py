"""Command-line values checked as they are parsed: argparse types that say what was expected
(exit 2, before any work), and a help formatter that shows every default."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service.spec import NAME_PATTERN

Number = TypeVar("Number", int, float)


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


def _checked(
    convert: Callable[[str], Number], valid: Callable[[Number], bool], expected: str
) -> Callable[[str], Number]:
    """An argparse type: `convert`, then `valid`; either failing says what was `expected`."""

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer 0 or more")  # seeds, indices
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a number above 0")
fraction = _checked(float, lambda v: 0 < v < 1, "a fraction between 0 and 1")


def float_list(text: str) -> list[float]:
    """'0.485,0.456,0.406' -> three floats: one per channel."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, one per channel, got {text!r}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not a finite number")
    return values


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


def existing_path(text: str) -> Path:
    """An argparse type: a file or a folder that is there."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return path


def existing_folder(text: str) -> Path:
    """An argparse type: a folder that is there."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def output_folder(text: str) -> Path:
    """An argparse type: a folder to write into (made when missing), not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder for the pictures")
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
