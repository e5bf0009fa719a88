"""The service's error hierarchy; every failure a user can cause is one of these.

    ServiceError
    ├── BadRequestError (400)
    │   ├── InvalidImageError
    │   ├── ImageTooLargeError
    │   │   └── DecompressionBombError
    │   └── MalformedRequestError
    ├── NotFoundError (404)
    │   ├── ModelNotFoundError
    │   ├── VersionNotFoundError
    │   ├── LayerNotFoundError
    │   ├── ImageNotHeldError
    │   ├── CaptureOffError
    │   └── CaptureNotFoundError
    ├── NotAcceptableError (406)
    ├── RequestTimeoutError (408)
    ├── PayloadTooLargeError (413)
    ├── UriTooLongError (414)
    ├── UnsupportedMediaTypeError (415)
    │   └── UnsupportedImageFormatError
    ├── InvalidParameterError (422)
    ├── ModelRefusedError (422)
    ├── HeatmapsUnavailableError (422)
    ├── UnauthorizedError (401)
    ├── ForbiddenError (403)
    ├── ConflictError (409)
    ├── HeadersTooLargeError (431)
    ├── ClientClosedError (499)
    ├── InferenceError (500)
    ├── UnavailableError (503)
    │   ├── QueueFullError
    │   ├── ModelNotReadyError
    │   └── TooManyConnectionsError
    └── DeadlineExceededError (504)

    ModelLoadError, ArchitectureError: raised while building or loading a model; not HTTP
    errors by themselves (the store reports them per model, the CLI prints them);
    InputMismatchError (an ArchitectureError) also carries an input shape that fits.

    CommandError: a command line's work failed although its arguments were valid (exit 1;
    a wrong value is a ValueError, exit 2)
    ├── UnreadableFileError
    └── TrainingError

Domain code raises these; app.py turns them into RFC 9457 problem+json in one place. Requests
refused before they reach the app (malformed, over the head limits, too many connections) are
rendered the same way by service/protocols.py.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error that is reported to a client."""

    status_code: int = 500
    title: str = "Internal error"
    slug: str = "internal-error"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.headers = headers or {}


class BadRequestError(ServiceError):
    status_code = 400
    title = "Bad request"
    slug = "bad-request"


class InvalidImageError(BadRequestError):
    title = "Invalid image"
    slug = "invalid-image"


class ImageTooLargeError(BadRequestError):
    title = "Image too large"
    slug = "image-too-large"


class DecompressionBombError(ImageTooLargeError):
    title = "Decompression bomb"
    slug = "decompression-bomb"


class MalformedRequestError(BadRequestError):
    """Broken HTTP framing; answered by the protocol (service/protocols.py), not the app."""

    slug = "malformed-request"


class UnauthorizedError(ServiceError):
    status_code = 401
    title = "Unauthorized"
    slug = "unauthorized"


class ForbiddenError(ServiceError):
    status_code = 403
    title = "Forbidden"
    slug = "forbidden"


class NotFoundError(ServiceError):
    status_code = 404
    title = "Not found"
    slug = "not-found"


class ModelNotFoundError(NotFoundError):
    title = "Model not found"
    slug = "model-not-found"


class VersionNotFoundError(NotFoundError):
    title = "Model version not found"
    slug = "version-not-found"


class LayerNotFoundError(NotFoundError):
    title = "Layer not found"
    slug = "layer-not-found"


class ImageNotHeldError(NotFoundError):
    title = "Image not held"
    slug = "image-not-held"


class CaptureOffError(NotFoundError):
    """The review page was opened on a server that captures nothing (no CONVSERVE_CAPTURE_DIR)."""

    title = "Capture is off"
    slug = "capture-off"


class CaptureNotFoundError(NotFoundError):
    """No such captured image waits for review (never captured, or reviewed already)."""

    title = "Capture not found"
    slug = "capture-not-found"


class RequestTimeoutError(ServiceError):
    status_code = 408
    title = "Request timeout"
    slug = "request-timeout"


class ConflictError(ServiceError):
    status_code = 409
    title = "Conflict"
    slug = "conflict"


class NotAcceptableError(ServiceError):
    status_code = 406
    title = "Not acceptable"
    slug = "not-acceptable"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    title = "Payload too large"
    slug = "payload-too-large"


class UriTooLongError(ServiceError):
    status_code = 414
    title = "URI too long"
    slug = "uri-too-long"


class HeadersTooLargeError(ServiceError):
    status_code = 431
    title = "Request header fields too large"
    slug = "headers-too-large"


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class UnsupportedImageFormatError(UnsupportedMediaTypeError):
    """The bytes are an image format outside CONVSERVE_FORMATS."""

    title = "Unsupported image format"
    slug = "unsupported-image-format"


class InvalidParameterError(ServiceError):
    status_code = 422
    title = "Invalid parameter"
    slug = "invalid-parameter"


class ModelRefusedError(ServiceError):
    """A version failed verification when asked to load; the old one keeps serving."""

    status_code = 422
    title = "Model version refused"
    slug = "model-refused"


class HeatmapsUnavailableError(ServiceError):
    """The version serves predictions but has no network to read heatmaps from (an imported
    graph torch cannot run); the detail says why."""

    status_code = 422
    title = "Heatmaps unavailable"
    slug = "heatmaps-unavailable"


class ClientClosedError(ServiceError):
    """The client hung up before its answer: its work was dropped (nginx's 499; nobody reads
    the response, the access log and metrics do)."""

    status_code = 499
    title = "Client closed request"
    slug = "client-closed-request"


class InferenceError(ServiceError):
    status_code = 500
    title = "Inference failed"
    slug = "inference-failed"


class UnavailableError(ServiceError):
    status_code = 503
    title = "Service unavailable"
    slug = "unavailable"


class QueueFullError(UnavailableError):
    title = "Queue full"
    slug = "queue-full"


class ModelNotReadyError(UnavailableError):
    title = "Model not ready"
    slug = "model-not-ready"


class TooManyConnectionsError(UnavailableError):
    title = "Too many connections"
    slug = "too-many-connections"


class ShuttingDownError(UnavailableError):
    title = "Shutting down"
    slug = "shutting-down"


class DeadlineExceededError(ServiceError):
    status_code = 504
    title = "Deadline exceeded"
    slug = "deadline-exceeded"


class ArchitectureError(ValueError):
    """An architecture name or its arguments are wrong; the message lists valid ones."""


class InputMismatchError(ArchitectureError):
    """An input shape the architecture cannot take; `fits` is one it can, when one was found."""

    def __init__(self, message: str, fits: tuple[int, int, int] | None) -> None:
        super().__init__(message)
        self.fits = fits


class ModelLoadError(Exception):
    """A model version failed validation; `reason` says why in words a user can act on."""

    def __init__(self, name: str, version: int | None, reason: str) -> None:
        where = name if version is None else f"{name} v{version}"
        super().__init__(f"model {where}: {reason}")
        self.name = name
        self.version = version
        self.reason = reason


class CommandError(Exception):
    """A command could not finish work it was validly asked for: the command line exits 1,
    where a value the user got wrong (a ValueError) exits 2."""


class UnreadableFileError(CommandError):
    """A file that exists could not be read as what it should be (image, state dict)."""


class TrainingError(CommandError):
    """Training ran and failed: the loss diverged, or torch refused a step."""
