"""Print convserve's runtime requirements from pyproject.toml, one per line, for the image build.

Usage: python3 requirements.py PYPROJECT [EXTRA,...]. The Dockerfile installs these before it
copies the source, so the heavy layers (torch) are rebuilt only when the requirements change.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        wanted += optional[extra]
    return wanted


def main(argv: list[str]) -> None:
    extras = [name for name in (argv[2] if len(argv) > 2 else "").split(",") if name]
    print("\n".join(requirements(Path(argv[1]), extras)))


if __name__ == "__main__":
    main(sys.argv)
