"""Review: the captured images waiting for a person, and the dataset their labels make.

The capture (service.capture) writes <capture dir>/<model>/<sha256>.<ext> with <sha256>.json
beside it. A review files the image as <dataset>/<model>/<label>/<sha256>.png, the ImageFolder
`convserve train --from <model> --data <dataset>/<model>` reads, or discards it; either way
the capture's two files go. Every front worker may serve a reviewer, so an item is claimed
first: its sidecar is renamed to a hidden name, which only one rename can do. The loser of a
race, or anyone acting on a list that is out of date, gets a 404 that says so. A claim a
crashed worker left behind is put back after CLAIM_STALE_S. Blocking file work: call it from a
thread, not the event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from service.atomic_file import write_atomically
from service.capture import EXTENSIONS
from service.errors import CaptureNotFoundError, InvalidParameterError
from service.spec import NAME_PATTERN, check_name

SHA256 = re.compile(r"[0-9a-f]{64}")
CLAIM = ".review-"  # a sidecar being acted on: hidden from the list
CLAIM_STALE_S = 300.0
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp",
               "bmp": "image/bmp", "tif": "image/tiff"}  # fmt: skip
FILE = re.compile(rf"([0-9a-f]{{64}})\.({'|'.join({*EXTENSIONS.values(), 'bin'})})")


class Guess(msgspec.Struct):
    label: str
    class_index: int
    probability: float


class Captured(msgspec.Struct):
    """One image waiting for review: its sidecar, as the capture wrote it."""

    sha256: str
    model: str
    version: int
    time: str
    reason: str
    predictions: list[Guess]
    file: str
    request_id: str | None = None


@dataclass(frozen=True)
class Claim:
    """An item one reviewer acts on: its sidecar renamed out of sight, its image still there."""

    model: str
    record: Captured
    sidecar: Path  # where the sidecar was
    claimed: Path  # where it is now
    image: Path


def check_sha(sha256: str) -> str:
    """A captured image's name: 64 lowercase hex digits, nothing that could walk elsewhere."""
    if not SHA256.fullmatch(sha256):
        raise InvalidParameterError(
            f"{sha256[:80]!r} is not a captured image's id: the 64 hex digits of its sha256"
        )
    return sha256


def check_label(label: str) -> str:
    """A label becomes a folder name: refuse what cannot be one (or would be another folder)."""
    if label in {"", ".", ".."} or "/" in label or "\0" in label:
        raise InvalidParameterError(
            f"label {label[:80]!r} cannot name a dataset folder; rename the class to file it"
        )
    return label


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")


class Review:
    """The captures of one server and the dataset its reviewers fill."""

    def __init__(self, captures: Path, dataset: Path) -> None:
        self.captures = captures
        self.dataset = dataset
        self._sidecars = msgspec.json.Decoder(Captured)

    def waiting(self) -> dict[str, int]:
        """Images waiting per model (models with none are left out)."""
        counts: dict[str, int] = {}
        if not self.captures.is_dir():
            return counts
        for folder in sorted(self.captures.iterdir()):
            if NAME_PATTERN.fullmatch(folder.name):
                count = len(self._sidecars_of(folder))
                if count:
                    counts[folder.name] = count
        return counts

    def items(self, model: str, limit: int) -> list[Captured]:
        """The oldest `limit` images of a model that wait (sidecars that do not parse, or whose
        image is not written yet, are left out)."""
        folder = self.captures / check_name(model)
        found: list[tuple[int, str, Path]] = []
        for path in self._sidecars_of(folder):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime_ns, path.name, path))
        listed = []
        for _, _, path in sorted(found):
            record = self._read(path)
            if record is not None and (folder / record.file).is_file():
                listed.append(record)
                if len(listed) >= limit:
                    break
        return listed

    def item(self, model: str, sha256: str) -> tuple[Captured, Path]:
        """A waiting image's sidecar and file; 404 once it is reviewed."""
        sidecar = self._sidecar(model, sha256)
        record = self._read(sidecar)
        if record is None or not (sidecar.parent / record.file).is_file():
            raise self._gone(model, sha256)
        return record, sidecar.parent / record.file

    def claim(self, model: str, sha256: str) -> Claim:
        """Take an item for this reviewer alone; 404 when it is gone or taken."""
        sidecar = self._sidecar(model, sha256)
        claimed = sidecar.with_name(f"{CLAIM}{sha256}")
        try:
            sidecar.rename(claimed)
            os.utime(claimed)  # the claim's age, not the capture's, says when it is stale
        except FileNotFoundError:
            raise self._gone(model, sha256) from None
        record = self._read(claimed)
        if record is None or not (sidecar.parent / record.file).is_file():
            with contextlib.suppress(OSError):
                claimed.rename(sidecar)
            raise self._gone(model, sha256)
        return Claim(model, record, sidecar, claimed, sidecar.parent / record.file)

    def release(self, claim: Claim) -> None:
        """Give a claim back untouched (the action failed): it waits in the list again."""
        with contextlib.suppress(FileNotFoundError):
            claim.claimed.rename(claim.sidecar)

    def file(self, claim: Claim, label: str, png: bytes) -> Path:
        """Write the PNG into the label's folder (a temporary name, renamed), then let the
        capture go. The same picture filed again replaces its PNG, under its new label only."""
        model = claim.model
        folder = self.dataset / model / check_label(label)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{claim.record.sha256}.png"
        write_atomically(target, png, CLAIM)
        for other in (self.dataset / model).glob(f"*/{target.name}"):
            if other != target:  # labelled before, another way: the latest review wins
                other.unlink(missing_ok=True)
        self.discard(claim)
        return target

    def discard(self, claim: Claim) -> None:
        """Remove the capture's image and sidecar."""
        claim.image.unlink(missing_ok=True)
        claim.claimed.unlink(missing_ok=True)

    def _sidecar(self, model: str, sha256: str) -> Path:
        return self.captures / check_name(model) / f"{check_sha(sha256)}.json"

    def _sidecars_of(self, folder: Path) -> list[Path]:
        """The sidecars in a model's folder; stale claims are put back first."""
        if not folder.is_dir():
            return []
        sidecars = []
        for path in folder.iterdir():
            if path.name.startswith(CLAIM):
                self._put_back(path)
            elif path.suffix == ".json" and SHA256.fullmatch(path.stem):
                sidecars.append(path)
        return sidecars

    def _put_back(self, claimed: Path) -> None:
        """A claim older than CLAIM_STALE_S belonged to a worker that died mid-review."""
        sha256 = claimed.name.removeprefix(CLAIM)
        with contextlib.suppress(OSError):
            if SHA256.fullmatch(sha256) and time.time() - claimed.stat().st_mtime > CLAIM_STALE_S:
                claimed.rename(claimed.with_name(f"{sha256}.json"))

    def _read(self, sidecar: Path) -> Captured | None:
        try:
            record = self._sidecars.decode(sidecar.read_bytes())
        except (OSError, msgspec.DecodeError):
            return None
        matched = FILE.fullmatch(record.file)
        if matched is None or matched[1] != sidecar.stem.removeprefix(CLAIM):
            return None  # a sidecar naming another file is not followed
        return record

    @staticmethod
    def _gone(model: str, sha256: str) -> CaptureNotFoundError:
        return CaptureNotFoundError(
            f"no captured image {sha256[:12]}... of model {model} waits for review: it was "
            "reviewed already (perhaps by someone else) or never captured; reload the list"
        )
