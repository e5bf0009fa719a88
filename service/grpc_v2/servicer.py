"""The GRPCInferenceService calls, over the same request path as the REST V2 routes.

ModelInfer runs through `Requests` (drain, queue places, decoding, batching, deadlines, the
response cache) and is counted in requests_total like an HTTP prediction, under the HTTP
status the same outcome gets over REST. The calls about models (metadata, readiness, config,
statistics) are answered by the V2 REST routes of this process's own app, so they reach the
model process wherever it runs. Errors become gRPC status codes with the problem's detail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from service import __version__, metrics, tracing
from service.errors import ServiceError
from service.grpc_v2 import inference_pb2 as pb
from service.grpc_v2.inference_pb2_grpc import GRPCInferenceServiceServicer
from service.grpc_v2.messages import infer_response, parse_infer
from service.inference import Requests
from service.logs import REQUEST_ID
from service.tensors import Limits

log = logging.getLogger("convserve.access")
M = TypeVar("M", bound=Message)
OFF_LOOP_BYTES = 1 << 20  # requests above this are parsed in a worker thread
MAX_DETAIL = 1000  # characters: percent-encoded UTF-8, at most 12 KiB in the trailers
EXTENSIONS = ["classification", "model_configuration", "statistics"]
Fetch = Callable[[str], Awaitable[tuple[int, bytes]]]
"""GET a path of this process's HTTP app: (status, body)."""

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # too many images; a message too large is grpc's own
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_for(status: int, slug: str) -> grpc.StatusCode:
    """The gRPC status of an HTTP problem: a full queue is RESOURCE_EXHAUSTED (retry later,
    elsewhere), any other 503 UNAVAILABLE."""
    if slug == "queue-full":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return CODES.get(status, grpc.StatusCode.INTERNAL)


async def fail(
    context: grpc.aio.ServicerContext[Any, Any], status: int, slug: str, detail: str
) -> NoReturn:
    if status == 503:
        context.set_trailing_metadata((("retry-after", "1"),))
    if len(detail) > MAX_DETAIL:  # it may echo a client's value; clients take 16 KiB of trailers
        detail = detail[: MAX_DETAIL - 3] + "..."
    await context.abort(code_for(status, slug), detail)
    raise AssertionError("abort returns only by raising")  # pragma: no cover


async def _named(name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if not name:
        await fail(context, 400, "bad-request", "the request names no model: set 'name'")


def _path(name: str, version: str, tail: str = "") -> str:
    where = f"/v2/models/{quote(name, safe='')}"
    if version:
        where += f"/versions/{quote(version, safe='')}"
    return where + tail


class Inference(GRPCInferenceServiceServicer):
    def __init__(self, requests: Requests, fetch: Fetch) -> None:
        self.requests = requests
        self.fetch = fetch

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.requests.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="convserve", version=__version__, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        """False, not an error, for a model that is unknown or not ready (as Triton answers)."""
        if self.requests.draining or not request.name:
            return pb.ModelReadyResponse(ready=False)
        status, _ = await self.fetch(_path(request.name, request.version, "/ready"))
        return pb.ModelReadyResponse(ready=status == 200)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        await _named(request.name, context)
        path = _path(request.name, request.version)
        return await self._get(path, pb.ModelMetadataResponse(), context)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        await _named(request.name, context)
        path = _path(request.name, request.version, "/config")
        return pb.ModelConfigResponse(config=await self._get(path, pb.ModelConfig(), context))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        path = (
            _path(request.name, request.version, "/stats") if request.name else "/v2/models/stats"
        )
        return await self._get(path, pb.ModelStatisticsResponse(), context)

    async def _get(self, path: str, message: M, context: grpc.aio.ServicerContext[Any, Any]) -> M:
        """The REST route's JSON as the protobuf message; its problem as a gRPC status."""
        status, body = await self.fetch(path)
        try:
            document = json.loads(body) if body else {}
        except ValueError:
            document = {}
        if not isinstance(document, dict):
            document = {}
        if status != 200:
            await fail(context, status, str(document.get("type", "")).rsplit("/", 1)[-1],
                       str(document.get("detail", f"HTTP {status}")))  # fmt: skip
        try:
            return json_format.ParseDict(document, message, ignore_unknown_fields=True)
        except json_format.ParseError as exc:  # a route answered what the message cannot hold
            log.error("gRPC: %s answered %s", path, exc)
            await fail(
                context, 500, "internal-error", f"the server's answer to {path} was not valid"
            )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        """One span per call (a client's traceparent metadata honoured), as REST requests."""
        metadata = dict(context.invocation_metadata() or ())
        parent = metadata.get("traceparent")
        attributes = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                      "rpc.method": "ModelInfer"}  # fmt: skip
        facts: dict[str, object] = {}
        with tracing.request_span(
            "ModelInfer", parent if isinstance(parent, str) else None, attributes
        ) as span:
            if span is not None:
                facts["trace_id"] = tracing.trace_id()
            try:
                return await self._model_infer(request, context, facts)
            finally:
                if span is not None:
                    for key in ("model", "version", "batch_size", "cache", "status"):
                        if key in facts:
                            span.set_attribute(f"convserve.{key}", str(facts[key]))

    async def _model_infer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        facts: dict[str, object],
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        status = 500
        metrics.INFLIGHT.inc()
        try:
            with self.requests.admitted():
                response = await self._infer(request, context, facts)
            status = 200
            return response
        except ServiceError as exc:
            status = exc.status_code
            if "model" not in facts and 400 <= status < 500:
                await self._name_refused(request, facts)
            await fail(context, status, exc.slug, exc.detail)
        except asyncio.CancelledError:  # the client hung up or its deadline passed
            status = 499
            raise
        except Exception:
            log.exception("gRPC ModelInfer failed")
            await fail(context, 500, "internal-error", "the server failed to answer; see its log")
        finally:
            elapsed = time.perf_counter() - started
            metrics.INFLIGHT.dec()
            model = str(facts.get("model", metrics.UNKNOWN))
            version = str(facts.get("version", metrics.UNKNOWN))
            metrics.REQUESTS.labels(model, version, str(status)).inc()
            metrics.REQUEST_DURATION.labels(model, str(status)).observe(elapsed)
            self._log(request, context, facts, status, elapsed)
            facts["status"] = status

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        facts: dict[str, object],
    ) -> pb.ModelInferResponse:
        requests = self.requests
        now = time.monotonic()
        deadline = now + requests.settings.deadline_s
        remaining = context.time_remaining()
        if remaining is not None:  # the client's own deadline, when sooner
            deadline = min(deadline, now + remaining)
        name, version = request.model_name or None, request.model_version or None
        first = await requests.route(name, version)
        facts.update(model=first.name, version=first.version)
        limits = Limits(requests.settings.max_images, first.input_shape, len(first.labels))
        if sum(len(raw) for raw in request.raw_input_contents) > OFF_LOOP_BYTES:
            parsed = await asyncio.to_thread(parse_infer, request, limits)
        else:
            parsed = parse_infer(request, limits)
        classified = await requests.classify(first, name, version, parsed.items, deadline)
        route = classified.route
        facts.update(model=route.name, version=route.version)
        if classified.cached:
            facts["cache"] = "hit"
        else:
            facts["batch_size"] = max(answer.batch_size for answer in classified.answers)
        probabilities = np.stack([answer.probabilities for answer in classified.answers])
        return infer_response(
            route.name, route.version, parsed.id, parsed.top_k, probabilities, route.labels
        )

    async def _name_refused(self, request: pb.ModelInferRequest, facts: dict[str, object]) -> None:
        """A refused request's model, when it names one the catalog knows (a bad version)."""
        try:
            route = await self.requests.models.route(request.model_name or None, None)
        except ServiceError:
            return
        facts.update(model=route.name, version=metrics.UNKNOWN)

    @staticmethod
    def _log(
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        facts: dict[str, object],
        status: int,
        elapsed: float,
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        record = {
            "method": "gRPC",
            "path": "/inference.GRPCInferenceService/ModelInfer",
            "status": status,
            "latency_ms": round(elapsed * 1000, 2),
            **facts,
        }
        if REQUEST_ID.fullmatch(request.id):
            record["request_id"] = request.id
        record["client"] = context.peer()
        log.info("access", extra={"access": record})
