"""Every Prometheus metric the service exports, in one place (prefix convserve_).

Labels stay low-cardinality: model and version come from the loaded catalog (never from a raw
request value), status is the HTTP code, reason a fixed word.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

# Milliseconds-scale work: 0.5 ms .. 30 s.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
PROBABILITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
UNKNOWN = "-"  # label value for requests that never reached a model
QUEUE_FULL, DEADLINE = "queue_full", "deadline"
REJECT_REASONS = (QUEUE_FULL, DEADLINE)

REQUESTS = Counter(
    "convserve_requests", "Prediction requests by outcome", ["model", "version", "status"]
)
IMAGES = Counter("convserve_images", "Images classified", ["model", "version"])
REJECTED = Counter("convserve_rejected", "Requests refused before inference", ["model", "reason"])
REQUEST_DURATION = Histogram(
    "convserve_request_duration_seconds",
    "Time from request arrival to response, prediction routes",
    ["model", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "convserve_queue_wait_seconds",
    "Time an image waited in the batch queue",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
PREPROCESS = Histogram(
    "convserve_preprocess_seconds",
    "Decode and preprocess time per image",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE = Histogram(
    "convserve_inference_seconds",
    "Forward-pass time per batch (kind: predict, gradcam, activation)",
    ["model", "version", "kind"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "convserve_batch_size", "Images per forward pass", ["model", "version"], buckets=BATCH_BUCKETS
)
TOP_PROBABILITY = Histogram(
    "convserve_top_probability",
    "Probability of the top class: its drift shows changing inputs",
    ["model", "version"],
    buckets=PROBABILITY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "convserve_queue_depth",
    "Images waiting for a forward pass",
    ["model", "version"],
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "convserve_queue_capacity",
    "Most images the queue admits (CONVSERVE_MAX_QUEUE)",
    ["model", "version"],
    multiprocess_mode="livemax",
)
INFLIGHT = Gauge(
    "convserve_inflight_requests",
    "Prediction requests being handled",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "convserve_model_info",
    "Loaded model versions (1 = ready, 0 = loaded but not serving)",
    ["model", "version", "architecture", "device"],
    multiprocess_mode="livemax",
)
MODEL_LOAD = Gauge(
    "convserve_model_load_seconds",
    "Time to verify, load and warm up a model version",
    ["model", "version"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_FAILURES = Counter(
    "convserve_model_load_failures", "Model versions refused at load", ["model"]
)
READY = Gauge(
    "convserve_ready",
    "1 when every configured model has a ready version",
    multiprocess_mode="livemin",
)
SMALL_IMAGES = Counter(
    "convserve_small_images",
    "Images a front worker decoded itself, without a decoder process (service.small_images)",
    ["model"],
)
DECODER_RESTARTS = Counter(
    "convserve_decoder_restarts",
    "Decoder processes replaced (reason: memory, died, deadline, cancelled)",
    ["reason"],
)
DEVICE_MEMORY = Gauge(
    "convserve_device_memory_bytes",
    "Memory allocated by torch on the CUDA device",
    ["device"],
    multiprocess_mode="livesum",
)
CACHE_LOOKUPS = Counter(
    "convserve_cache_lookups",
    "Images looked up in the response cache (result: hit, miss)",
    ["model", "result"],
)
CACHE_ENTRIES = Gauge(
    "convserve_cache_entries",
    "Answers held by the response cache, all worker processes together",
    multiprocess_mode="livesum",
)
CACHE_BYTES = Gauge(
    "convserve_cache_bytes",
    "Memory the response cache's answers and heatmap pictures take, all worker processes",
    multiprocess_mode="livesum",
)

CAPTURED = Counter(
    "convserve_captures",
    "Images kept for review (reason: low_confidence, class, sampled)",
    ["model", "reason"],
)
CAPTURE_DROPPED = Counter(
    "convserve_capture_dropped",
    "Images the capture rules picked but did not keep (reason: per_minute, quota, queue, disk)",
    ["reason"],
)
CAPTURE_BYTES = Gauge(
    "convserve_capture_bytes",
    "Disk the captured images and their sidecars use (CONVSERVE_CAPTURE_MB bounds it)",
    multiprocess_mode="livemax",
)

ROLLOUT_SHARE = Gauge(
    "convserve_rollout_share",
    "A running rollout: the share of the requests naming no version that the candidate answers "
    "(canary) or also runs on (shadow); 0 once it ends",
    ["model", "version", "mode"],
    multiprocess_mode="livemax",
)
SHADOW_IMAGES = Counter(
    "convserve_shadow_images",
    "Images a shadow candidate also classified, unseen by the client",
    ["model", "version"],
)
SHADOW_AGREED = Counter(
    "convserve_shadow_agreed",
    "Shadow images whose top-1 label matched the serving version's",
    ["model", "version"],
)
SHADOW_SECONDS = Histogram(
    "convserve_shadow_seconds",
    "A shadow candidate's time per request, from its queue to its answer",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
SHADOW_SKIPPED = Counter(
    "convserve_shadow_skipped",
    "Requests the shadow candidate did not run (reason: queue, deadline, error)",
    ["model", "reason"],
)


def render(accept: str) -> tuple[bytes, str]:
    """The exposition format the scraper asks for (prometheus-client negotiates it), from this
    process or, with several workers, from all of them."""
    encoder, content_type = choose_encoder(accept)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type
