"""Writes the example pictures used in the README: held-out MNIST digits as ink on paper.

.venv/bin/python -m tests.make_examples
"""

from __future__ import annotations

from pathlib import Path

from tests.support import digit_picture, held_out_digits

HERE = Path(__file__).resolve().parent.parent / "docs" / "examples"

if __name__ == "__main__":
    for digit in held_out_digits(12):
        path = HERE / f"digit-{digit.label}.jpg"
        if not path.exists():
            digit_picture(digit, size=280).save(path, quality=90)
            print(path)
