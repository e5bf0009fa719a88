"""OpenTelemetry traces: one span per request with its stages as children, and one span per
forward pass linked to every request in the batch.

Off unless the standard variables configure an OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it
off again). Off, nothing here imports the SDK and every helper costs one flag test. Each
process exports its own spans over OTLP/HTTP: a front worker its requests, the model process
its batches. A request's context reaches the model process as a W3C traceparent string.
Times measured with time.monotonic() (one clock for every process on the machine) become span
times through `wall_ns`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

_tracer: Tracer | None = None
_OFFSET_NS = time.time_ns() - time.monotonic_ns()  # monotonic -> wall clock, this boot


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(role: str) -> bool:
    """Start exporting this process's spans when the environment asks for it; `role` (single,
    front, model) tells the processes apart in the trace. The exporter flushes at exit."""
    global _tracer
    if _tracer is not None or not wanted():
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from service import __version__

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "convserve"),
            "service.version": __version__,
            "convserve.process": role,
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    _tracer = trace.get_tracer("convserve", __version__)
    return True


def enabled() -> bool:
    return _tracer is not None


def wall_ns(monotonic: float) -> int:
    return _OFFSET_NS + int(monotonic * 1e9)


def _context_of(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent or ""})


@contextlib.contextmanager
def request_span(
    name: str, traceparent: str | None, attributes: Mapping[str, str]
) -> Iterator[Span | None]:
    """The span of one HTTP request, current while it is handled; a W3C `traceparent` the
    client sent makes it that trace's child."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    context = _context_of(traceparent)
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind.SERVER, attributes=dict(attributes)
    ) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attributes: str | int) -> Iterator[None]:
    """A child of the current span around a stage of the request (no-op when off)."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


def record(name: str, started: float, ended: float, **attributes: str | int) -> None:
    """A child of the current span for a stage timed elsewhere (monotonic seconds)."""
    if _tracer is None:
        return
    done = _tracer.start_span(name, start_time=wall_ns(started), attributes=attributes)
    done.end(end_time=wall_ns(max(started, ended)))


def traceparent() -> str | None:
    """The current span as a W3C traceparent, to hand to the model process; None when off."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def trace_id() -> str | None:
    """The current trace's id in hex, for the access log; None when off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def batch(
    name: str,
    started: float,
    ended: float,
    requests: Sequence[str | None],
    attributes: Mapping[str, str | int],
) -> None:
    """One forward pass, as a root span linked to the span of every request in the batch
    (`requests`: their traceparents). Safe from the inference thread."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link

    links = []
    for parent in dict.fromkeys(requests):  # one link per request, however many images
        context = trace.get_current_span(_context_of(parent)).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    done = _tracer.start_span(
        name,
        context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: batches serve many
        links=links,
        start_time=wall_ns(started),
        attributes=dict(attributes),
    )
    done.end(end_time=wall_ns(ended))
