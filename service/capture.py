"""Capture: keep the images a model was unsure of, for people to look at and label.

Off unless CONVSERVE_CAPTURE_DIR is set. A classified image is kept when its top-1 probability
is below CONVSERVE_CAPTURE_BELOW, when its predicted class is one of CONVSERVE_CAPTURE_CLASSES,
or in a CONVSERVE_CAPTURE_RATE sample of the rest. Then two bounds apply:
CONVSERVE_CAPTURE_PER_MINUTE over the whole server (each front worker takes its share) and
CONVSERVE_CAPTURE_MB on disk.

The request never waits on the disk. Each worker decides in the event loop (a comparison and a
counter) and hands what it keeps to one writer thread through a bounded queue. What is dropped
(queue full, over the cap or the quota, a disk that fails) is counted by reason in /metrics and
never turns into an error for a client. A disk that fails (full, read-only) stops capturing
for a minute, with one log line, and then it tries again.

On disk: <dir>/<model>/<sha256>.<ext> holds the original bytes, and <sha256>.json beside it
holds the prediction, model, version, request id and time. Each is written under a temporary
name and renamed, so a reader never sees half a file. The same image is kept once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import metrics
from service.atomic_file import write_atomically
from service.config import Settings

log = logging.getLogger("convserve.capture")
QUEUE = 256  # images waiting for the writer; more are dropped, the request is not slowed
QUEUE_BYTES = 64 * 1024 * 1024  # and their bytes: 256 bodies of 16 MB would be 4 GB of memory
PAUSE_S = 60.0  # after a disk error
RESCAN_S = 10.0  # how often the disk use of every worker's captures is summed again
EXTENSIONS = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"RIFF": "webp",
              b"BM": "bmp", b"II*\x00": "tif", b"MM\x00*": "tif"}  # fmt: skip
LOW, CLASS, SAMPLED = "low_confidence", "class", "sampled"


def extension(data: bytes) -> str:
    """The file extension of an encoded image, by its magic bytes ('bin' when unknown)."""
    return next((ext for magic, ext in EXTENSIONS.items() if data.startswith(magic)), "bin")


def disk_use(folder: Path) -> int:
    """Bytes of the files below `folder` (0 when it is not there)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


@dataclass(frozen=True)
class Kept:
    model: str
    version: int
    data: bytes
    record: dict[str, object]


class Capture:
    """One front worker's capture: the rules, its share of the cap, and its writer thread."""

    def __init__(self, settings: Settings, workers: int) -> None:
        assert settings.capture_dir is not None
        self.folder = settings.capture_dir
        self.below = settings.capture_below
        self.classes = set(settings.capture_classes)
        self.rate = settings.capture_rate
        self.per_minute = math.ceil(settings.capture_per_minute / max(workers, 1))
        self.quota = settings.capture_mb * 1024 * 1024
        self.minute = (0, 0)  # (minute number, images kept in it)
        self.pending: queue.Queue[Kept | None] = queue.Queue(QUEUE)
        self.queued = 0  # bytes in `pending`, under `lock` (the writer takes them off)
        self.lock = threading.Lock()
        self.paused_until = 0.0
        self.used = 0
        self.scanned = 0.0
        # a daemon: a worker that dies without close() must still exit
        self.writer = threading.Thread(
            target=self._write_all, name="convserve-capture", daemon=True
        )
        self.writer.start()

    def offer(
        self,
        model: str,
        version: int,
        labels: Sequence[str],
        images: Sequence[bytes],
        probabilities: Sequence[np.ndarray],
        request_id: str | None,
    ) -> None:
        """Decide for each image of one answered request; keep what the rules pick."""
        for data, row in zip(images, probabilities, strict=True):
            best = int(np.argmax(row))
            reason = self._reason(float(row[best]), labels[best])
            if reason is None:
                continue
            dropped = self._bound()
            if dropped is not None:
                metrics.CAPTURE_DROPPED.labels(dropped).inc()
                continue
            order = np.argsort(row)[::-1][:5]
            record: dict[str, object] = {
                "model": model, "version": version, "request_id": request_id,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason,
                "predictions": [{"label": labels[i], "class_index": int(i),
                                 "probability": float(row[i])} for i in order],
            }  # fmt: skip
            if not self._enqueue(Kept(model, version, data, record)):
                metrics.CAPTURE_DROPPED.labels("queue").inc()
                continue
            metrics.CAPTURED.labels(model, reason).inc()

    def _enqueue(self, kept: Kept) -> bool:
        """Queue for the writer unless the queue is full, in images or in bytes."""
        with self.lock:
            if self.queued + len(kept.data) > QUEUE_BYTES:
                return False
            try:
                self.pending.put_nowait(kept)
            except queue.Full:
                return False
            self.queued += len(kept.data)
        return True

    def _reason(self, top: float, label: str) -> str | None:
        if top < self.below:
            return LOW
        if label in self.classes:
            return CLASS
        if self.rate and random.random() < self.rate:
            return SAMPLED
        return None

    def _bound(self) -> str | None:
        """Why this image may not be kept now (None: it may): the cap, the quota, the disk."""
        if time.monotonic() < self.paused_until:
            return "disk"
        if self.used >= self.quota:
            return "quota"
        now = int(time.time() // 60)
        minute, count = self.minute if self.minute[0] == now else (now, 0)
        if count >= self.per_minute:
            return "per_minute"
        self.minute = (minute, count + 1)
        return None

    def close(self) -> None:
        """Write what is queued, then stop the writer (the worker is shutting down); a disk
        that hangs holds the shutdown at most 10 s."""
        with contextlib.suppress(queue.Full):
            self.pending.put(None, timeout=10)
        self.writer.join(timeout=10)

    def _write_all(self) -> None:
        self.used = disk_use(self.folder)
        metrics.CAPTURE_BYTES.set(self.used)
        while (kept := self.pending.get()) is not None:
            with self.lock:
                self.queued -= len(kept.data)
            if time.monotonic() - self.scanned > RESCAN_S:  # the other workers write too
                self.used, self.scanned = disk_use(self.folder), time.monotonic()
            try:
                self.used += self._write(kept)
            except OSError as exc:
                self.paused_until = time.monotonic() + PAUSE_S
                metrics.CAPTURE_DROPPED.labels("disk").inc()
                log.error("capture: cannot write to %s (%s); capturing again in %.0f s",
                          self.folder, exc, PAUSE_S)  # fmt: skip
            metrics.CAPTURE_BYTES.set(self.used)

    def _write(self, kept: Kept) -> int:
        """The image and its sidecar, each renamed into place; the bytes added."""
        folder = self.folder / kept.model
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(kept.data).hexdigest()
        image = folder / f"{digest}.{extension(kept.data)}"
        if image.exists():  # the same picture again: kept once
            return 0
        record = json.dumps({**kept.record, "sha256": digest, "file": image.name}, indent=2)
        written = 0
        for path, content in ((folder / f"{digest}.json", record.encode()), (image, kept.data)):
            write_atomically(path, content, ".capture-")
            written += len(content)
        return written
