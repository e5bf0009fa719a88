"""Per-version inference statistics as Triton reports them (GET /v2/models/{m}/stats, gRPC
ModelStatistics), counted by the batcher where images are run.

Counted per image, the unit the batcher sees (a request's images may ride in several
batches): `success` is each answered image's time from entering the queue to its answer,
`queue` its wait, `compute_infer` the forward pass it rode in (a batch's time counts once for
each of its images, as Triton counts it once per request). `fail` holds images dropped past
their deadline or failed by the model. `inference_count` is images run, `execution_count`
forward passes; `batch_stats` counts passes and their time by batch size. Warm-up runs are
not counted. A reload starts from zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

NS = 1_000_000_000


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += round(seconds * NS)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Statistics:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ran(self, waits: list[float], elapsed: float, answered: int) -> None:
        """One forward pass over len(waits) images (each waited waits[i] seconds), of which
        `answered` got answers (a failed pass is retried image by image)."""
        size = len(waits)
        with self.lock:
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.queue.add(size, sum(waits))
            self.compute_infer.add(size, size * elapsed)
            self.success.add(answered, sum(waits[:answered]) + answered * elapsed)
            self.fail.add(size - answered, sum(waits[answered:]) + (size - answered) * elapsed)
            self.batches.setdefault(size, Duration()).add(1, elapsed)

    def failed(self, count: int, seconds: float) -> None:
        """Images dropped unrun (past their deadline) after `seconds` in the queue in all."""
        with self.lock:
            self.fail.add(count, seconds)

    def to_json(self, name: str, version: int) -> dict[str, Any]:
        """One entry of Triton's `model_stats`."""
        zero = Duration().to_json()
        with self.lock:
            return {
                "name": name,
                "version": str(version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_json(),
                    "fail": self.fail.to_json(),
                    "queue": self.queue.to_json(),
                    "compute_input": zero,
                    "compute_infer": self.compute_infer.to_json(),
                    "compute_output": zero,
                    "cache_hit": zero,
                    "cache_miss": zero,
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": zero,
                        "compute_infer": self.batches[size].to_json(),
                        "compute_output": zero,
                    }
                    for size in sorted(self.batches)
                ],
            }
