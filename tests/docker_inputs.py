"""What `make docker-test` builds from: system packages, a Debian base, a wheelhouse.

None of it comes from a container registry: the base image is a debootstrapped Debian
(kept in .docker-cache/ between runs) and the wheels come from the host's pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

DOCKER = Path("/usr/bin/docker")  # Debian's client, the daemon's own version
PACKAGES = {  # command: the Debian package that brings it
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
    "prometheus": "prometheus",
}
SUITE = "bookworm"  # python3 is 3.11 there, as in python:3.11-slim
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
MIRROR = os.environ.get("CONVSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TORCH = os.environ.get("CONVSERVE_WHEELHOUSE_TORCH", "torch==2.13.0+cpu")
CACHE = ROOT / ".docker-cache"
WHEELHOUSE = ROOT / "docker" / "wheelhouse"


def install_packages() -> None:
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if not shutil.which(cmd)})
    if not DOCKER.exists():
        missing = sorted({*missing, "docker.io"})
    if not missing:
        print(f"    already installed: {', '.join(sorted(set(PACKAGES.values())))}")
        return
    if os.geteuid() != 0:
        sys.exit(f"needs root to install {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    subprocess.run(install, check=True, env=env)


def base_tarball(tmp: Path) -> Path:
    """A minbase Debian root filesystem with Python, made once and kept in .docker-cache/."""
    tarball = CACHE / f"debian-{SUITE}-minbase-python3.tar"
    if tarball.exists():
        print(f"    cached: {tarball.relative_to(ROOT)}")
        return tarball
    rootfs = tmp / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, rootfs, MIRROR],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        shutil.rmtree(rootfs / junk, ignore_errors=True)
    CACHE.mkdir(exist_ok=True)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "--numeric-owner", "-C", rootfs, "-cf", partial, "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(rootfs)
    return tarball


def empty_wheelhouse() -> None:
    """Left full, the wheelhouse would also be all a later `docker build` installs from."""
    for wheel in WHEELHOUSE.glob("*.whl"):
        wheel.unlink()


def fill_wheelhouse() -> None:
    """Every wheel the image installs, from the host's pip (its find-links hold torch CPU)."""
    empty_wheelhouse()
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    result = subprocess.run(
        [*pip, "--dest", WHEELHOUSE, ROOT, TORCH, "setuptools>=69"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        hint = (
            f"{TORCH} comes from this machine's pip find-links; elsewhere set"
            " PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or"
            " CONVSERVE_WHEELHOUSE_TORCH to a torch release your index has"
        )
        sys.exit(f"pip download failed ({hint}):\n{result.stdout}{result.stderr}")
    wheels = sorted(WHEELHOUSE.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"    {len(wheels)} wheels, {size:.0f} MiB, {TORCH}")
