"""Settings: one frozen object built from CONVSERVE_* variables and the matching CLI flags.

Every command reads the variables that apply to it and its flags override them; a bad value
names both spellings, and a CONVSERVE_* variable that is no setting is named with the closest
one, because a typo that is silently ignored is a misconfiguration nobody sees.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "CONVSERVE_"
N = TypeVar("N", int, float)
# CONVSERVE_* names that are read by the project's tooling, not by the service
TOOLING = {
    "CONVSERVE_CHROMIUM": "the page tests' Chromium",
    "CONVSERVE_DEBIAN_MIRROR": "the docker test's base image",
    "CONVSERVE_IMAGE": "the docker test's image tag",
    "CONVSERVE_WHEELHOUSE_TORCH": "the docker build's torch wheel",
}
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # Pillow's names for what we decode


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and the flag."""


def _int(text: str, rule: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(rule) from None


def _float(text: str, rule: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(rule) from None


def _whole(minimum: int) -> Callable[[str], int]:
    """A parser for whole numbers of at least `minimum`."""
    rule = f"must be a whole number >= {minimum}"

    def parse(text: str) -> int:
        value = _int(text, rule)
        if value < minimum:
            raise ValueError(rule)
        return value

    return parse


_positive_int = _whole(1)
_non_negative_int = _whole(0)


def default_cache() -> Path:
    """Where derived files go when the store must not be written: $XDG_CACHE_HOME/convserve."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convserve"


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return max(1, len(os.sched_getaffinity(0)))


def _workers(text: str) -> int:
    """`auto` (one worker per core), or a count; 0 is the whole service in one process."""
    if text.strip().lower() == "auto":
        return available_cores()
    rule = "must be auto or a whole number >= 0"
    value = _int(text, rule)
    if value < 0:
        raise ValueError(rule)
    return value


def _non_negative_float(text: str) -> float:
    rule = "must be a number >= 0"
    value = _float(text, rule)
    if not value >= 0 or value == float("inf"):
        raise ValueError(rule)
    return value


def _positive_float(text: str) -> float:
    rule = "must be a number > 0"
    value = _float(text, rule)
    if not value > 0 or value == float("inf"):
        raise ValueError(rule)
    return value


def _within(convert: Callable[[str, str], N], low: N, high: N, rule: str) -> Callable[[str], N]:
    """A parser for numbers from `low` to `high` (both included) read by `convert`."""

    def parse(text: str) -> N:
        value = convert(text, rule)
        if not low <= value <= high:  # NaN too
            raise ValueError(rule)
        return value

    return parse


_port = _within(_int, 0, 65535, "must be a port number 0..65535")
_fraction = _within(_float, 0.0, 1.0, "must be a number from 0 to 1")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_path(text: str) -> Path | None:
    return Path(text) if text.strip() else None


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _formats(text: str) -> tuple[str, ...]:
    """Pillow format names; a typo would silently refuse every image, so each is checked."""
    from PIL import Image  # only when the variable is set: importing Pillow is not free

    names = tuple(name.upper() for name in _names(text))
    if not names:
        raise ValueError("must name at least one image format")
    Image.init()
    unknown = [name for name in names if name not in Image.OPEN]
    if unknown:
        known = ", ".join(sorted(Image.OPEN))
        raise ValueError(f"{', '.join(unknown)}: not a format Pillow reads; known: {known}")
    return names


def _text(value: object) -> str:
    """A setting's value as its variable would spell it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _optional_threads(text: str) -> int | None:
    return _positive_int(text) if text.strip() else None


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told; defaults serve the bundled models under load."""

    store: Path = Path("model_store")
    cache_dir: Path = dataclasses.field(default_factory=default_cache)
    allow_empty: bool = False
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001
    workers: int = dataclasses.field(default_factory=available_cores)
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 512
    deadline_ms: float = 30_000.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = FORMATS
    max_images: int = 256
    default_model: str | None = None
    models: tuple[str, ...] = ()
    api_key: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    watch: bool = False
    watch_interval_s: float = 2.0
    warmup: bool = True
    engine: str = "auto"
    threads: int | None = None
    decode_threads: int = 2
    decode_memory_mb: int = 1024
    drain_s: float = 30.0
    drain_delay_s: float = 1.0
    max_header_count: int = 100
    max_header_bytes: int = 64 * 1024
    max_request_line_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    cache_entries: int = 4096
    cache_mb: int = 64
    capture_dir: Path | None = None
    capture_below: float = 0.5
    capture_classes: tuple[str, ...] = ()
    capture_rate: float = 0.0
    capture_per_minute: int = 60
    capture_mb: int = 1024
    dataset_dir: Path | None = None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, str] | None = None,
        only: Collection[str] | None = None,
    ) -> Settings:
        """Build settings from CONVSERVE_* entries, then `flags` (field name -> text) on top;
        `only` limits both to the fields a command uses. A bad value raises SettingsError."""
        env = os.environ if environ is None else environ
        given = flags or {}
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if only is not None and field.name not in only:
                continue
            key, flag = env_name(field.name), flag_name(field.name)
            if field.name in given:
                text, where = given[field.name], f"{flag} {given[field.name]!r} ({key})"
            elif key in env:
                text, where = env[key], f"{key}={env[key]!r} ({flag})"
            else:
                continue
            try:
                values[field.name] = PARSERS[field.name](text)
            except ValueError as exc:
                raise SettingsError(f"{where}: {exc}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """Every setting as the CONVSERVE_* text from_env() reads back to an equal Settings:
        how the supervisor hands its settings (flags included) to worker processes."""
        return {env_name(f.name): _text(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def labelled_dir(self) -> Path | None:
        """Where the review page files labelled captures: CONVSERVE_DATASET_DIR, else a sibling
        of the capture dir (`captured` -> `captured-labelled`); None with capture off."""
        if self.dataset_dir is not None or self.capture_dir is None:
            return self.dataset_dir
        capture = self.capture_dir.absolute()
        return capture.with_name(f"{capture.name}-labelled")

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0


def env_name(field_name: str) -> str:
    """The environment variable for a settings field: max_batch_size -> CONVSERVE_MAX_BATCH_SIZE."""
    return PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """The command-line flag for a settings field: max_batch_size -> --max-batch-size."""
    return "--" + field_name.replace("_", "-")


def default_text(field_name: str) -> str:
    """A setting's default as --help shows it."""
    if field_name == "workers":
        return "auto"
    if field_name == "cache_dir":
        return "$XDG_CACHE_HOME/convserve"
    if field_name == "dataset_dir":
        return "<capture dir>-labelled"
    return _text(getattr(Settings(), field_name)) or "none"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per CONVSERVE_* variable that is no setting, with the closest setting named."""
    known = [env_name(field.name) for field in dataclasses.fields(Settings)]
    lines = []
    for key in sorted(environ):
        if not key.startswith(PREFIX) or key in known or key in TOOLING:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{key} is not a convserve setting and is ignored{hint}")
    return lines


PARSERS: dict[str, Callable[[str], Any]] = {
    "store": Path,
    "cache_dir": Path,
    "allow_empty": _flag,
    "device": _choice("auto", "cpu", "cuda"),
    "host": str,
    "port": _port,
    "grpc_port": _port,
    "workers": _workers,
    "max_batch_size": _positive_int,
    "max_delay_ms": _non_negative_float,
    "max_queue": _positive_int,
    "deadline_ms": _non_negative_float,
    "max_body_bytes": _positive_int,
    "max_pixels": _positive_int,
    "formats": _formats,
    "max_images": _positive_int,
    "default_model": _optional_str,
    "models": _names,
    "api_key": _optional_str,
    "log_format": _choice("text", "json"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "watch": _flag,
    "watch_interval_s": _non_negative_float,
    "warmup": _flag,
    "engine": _choice("auto", "torch", "onnxruntime", "openvino"),
    "threads": _optional_threads,
    "decode_threads": _positive_int,
    "decode_memory_mb": _positive_int,
    "drain_s": _non_negative_float,
    "drain_delay_s": _non_negative_float,
    "max_header_count": _positive_int,
    "max_header_bytes": _positive_int,
    "max_request_line_bytes": _positive_int,
    "header_timeout_s": _positive_float,
    "max_connections": _positive_int,
    "cache_entries": _non_negative_int,
    "cache_mb": _non_negative_int,
    "capture_dir": _optional_path,
    "capture_below": _fraction,
    "capture_classes": _names,
    "capture_rate": _fraction,
    "capture_per_minute": _non_negative_int,
    "capture_mb": _non_negative_int,
    "dataset_dir": _optional_path,
}

HELP: dict[str, str] = {
    "store": "model store directory (relative paths from the current directory)",
    "cache_dir": (
        "where exported engine files go when the store lacks them (the service never writes "
        "to its store)"
    ),
    "allow_empty": (
        "start even if the store is missing or empty, or a configured model is not in it"
    ),
    "device": "auto | cpu | cuda (auto: cuda when available)",
    "host": "address to bind",
    "port": "port to bind",
    "grpc_port": (
        "port of the Open Inference Protocol's gRPC service, on the same host (0: no gRPC)"
    ),
    "workers": (
        "front worker processes for HTTP and decoding, beside one model process (auto: one "
        "per core; 0: the whole service in one process)"
    ),
    "max_batch_size": "largest batch one forward pass takes",
    "max_delay_ms": "longest a batch waits for more requests already on their way",
    "max_queue": "queued images per model version before 503",
    "deadline_ms": "a request not answered within this gets 504",
    "max_body_bytes": "largest request body (413 above)",
    "max_pixels": "largest decoded image in pixels (400 above)",
    "formats": "comma-separated Pillow formats that may be decoded (415 for others)",
    "max_images": "most images in one request (413 above)",
    "default_model": "model served when a request names none",
    "models": "comma-separated model names to load (default: all in the store)",
    "api_key": "enables the management API; clients send it as a Bearer token or X-API-Key",
    "log_format": "text | json access logs",
    "log_level": "debug | info | warning | error",
    "watch": "load new versions that appear in the store",
    "watch_interval_s": "how often the store is scanned when watching",
    "warmup": "run a version before it takes traffic (CPU: largest batch and 1; GPU: every size)",
    "engine": "auto (the fastest that agrees with torch, measured at load) | torch | "
    "onnxruntime | openvino",
    "threads": "torch intra-op threads (default: torch's choice)",
    "decode_threads": "images one worker decodes at once, each in its own decoder process",
    "decode_memory_mb": "memory one decoder process may use for an image (more: 400, replaced)",
    "drain_s": "longest graceful shutdown waits for admitted requests",
    "drain_delay_s": "after SIGTERM, report not ready at least this long before closing sockets",
    "max_header_count": "most header fields in one request (431 above)",
    "max_header_bytes": "largest total of a request's header fields in bytes (431 above)",
    "max_request_line_bytes": "longest request line, method and target, in bytes (414 above)",
    "header_timeout_s": "a connection must send a whole request head this soon (408, closed)",
    "max_connections": "open connections per worker process; beyond it 503 and closed",
    "cache_entries": (
        "answers each worker process keeps for images sent again (0: no response cache)"
    ),
    "cache_mb": (
        "memory each worker process's response cache may hold, heatmaps included (and the "
        "model process's kept images)"
    ),
    "capture_dir": (
        "keep uncertain images here for review (off when unset; never inside the store)"
    ),
    "capture_below": "capture an image whose top-1 probability is below this",
    "capture_classes": "comma-separated labels: capture every image predicted as one of them",
    "capture_rate": "capture this share (0..1) of all other classified images",
    "capture_per_minute": "most images captured per minute, over all workers",
    "capture_mb": "disk the captured images and their sidecars may use",
    "dataset_dir": (
        "where the review page files labelled captures, one folder per label, as `convserve "
        "train --data` reads (never inside the store or the capture dir)"
    ),
}
