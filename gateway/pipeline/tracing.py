"""OpenTelemetry, when asked for: a span per request, per stage and finalizer, per upstream attempt.

Off unless the standard ``OTEL_*`` variables ask for traces (``tracing_from_env``): then the chain
is built with its stages and finalizers wrapped (``Tracing.stage``), so a gateway without tracing
runs exactly the chain it ran before, and the only per-request test is the one ``Chain.answer``
makes. On, with the OTLP/HTTP exporter configured by ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers,
timeout) and the SDK's own ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``:

    x402gw.request (SERVER; the client's traceparent, if any, as its parent)
    ├── x402gw.stage.<name>, each stage that ran, in order
    │   └── x402gw.upstream.attempt (CLIENT), under x402gw.stage.bridge, one per try
    └── x402gw.finalizer.<name>   (audit: the trail's write)

Each upstream attempt carries the W3C ``traceparent`` of its span, and the audit trail records the
request's (``response`` event) and each attempt's (``upstream_attempt``), so a trace and the audit
trail name each other. Spans carry no header, query string, argument or credential.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.responses import Response

from gateway.pipeline.context import Finalizer, RequestContext, Stage

__all__ = ["TRACEPARENT", "Tracing", "tracing_from_env"]

TRACEPARENT = "traceparent"
_INSTRUMENTATION = "x402gw"
_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER: DefaultGetter = DefaultGetter()


def tracing_from_env(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing with the OTLP/HTTP exporter when the environment asks for traces: an OTLP endpoint
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER=otlp``,
    and not ``OTEL_SDK_DISABLED=true``; else None (nothing imported beyond the API, nothing run)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter == "none" or not (endpoint or exporter == "otlp"):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; the provider reads the
    # sampler variables; the exporter reads OTEL_EXPORTER_OTLP_* (endpoint, headers, timeout).
    provider = TracerProvider(resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "x402gw")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider.get_tracer(_INSTRUMENTATION), shutdown=provider.shutdown)


class Tracing:
    def __init__(self, tracer: Tracer, shutdown: Callable[[], Any] | None = None) -> None:
        self.tracer = tracer
        self._shutdown = shutdown

    @classmethod
    def from_provider(cls, provider: trace.TracerProvider) -> Tracing:
        return cls(provider.get_tracer(_INSTRUMENTATION))

    def shutdown(self) -> None:
        """Flush what is queued (at the app's shutdown)."""
        if self._shutdown is not None:
            self._shutdown()

    def stage(self, stage: Stage) -> Stage:
        return _TracedStage(stage, self.tracer)

    def finalizer(self, finalizer: Finalizer) -> Finalizer:
        return _TracedFinalizer(finalizer, self.tracer)

    async def request(self, ctx: RequestContext, answer: Callable[[], Awaitable[Response]]) -> Response:
        """The request's span around its whole answer (stages and finalizers)."""
        carrier = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in ctx.raw_headers
                   if name.lower() in (b"traceparent", b"tracestate")}
        parent = _PROPAGATOR.extract(carrier, getter=_GETTER) if carrier else None
        with self.tracer.start_as_current_span(
            "x402gw.request", context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": ctx.method, "url.path": ctx.path, "x402gw.request_id": ctx.request_id},
        ) as span:
            ctx.tracing = self
            ctx.traceparent = _traceparent()
            response = await answer()
            span.set_attribute("http.response.status_code", response.status_code)
            span.set_attribute("x402gw.outcome", ctx.outcome)
            if ctx.tool is not None:
                span.set_attribute("x402gw.tool", ctx.tool.name)
            if ctx.reason is not None:
                span.set_attribute("x402gw.reason", ctx.reason)
            if ctx.payment_id is not None:
                span.set_attribute("x402gw.payment_id", ctx.payment_id)
            return response

    @contextmanager
    def upstream_attempt(self, method: str, url: str, attempt: int, headers: dict[str, str]) -> Iterator[Any]:
        """One try of the upstream call: a CLIENT span, its ``traceparent`` put in ``headers``."""
        with self.tracer.start_as_current_span(
            "x402gw.upstream.attempt", kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url, "x402gw.attempt": attempt},
        ) as span:
            _PROPAGATOR.inject(headers)
            yield span


def _traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


class _TracedStage:
    def __init__(self, stage: Stage, tracer: Tracer) -> None:
        self.inner = stage
        self.name = stage.name
        self.shape_only = stage.shape_only
        self._tracer = tracer
        self._span_name = f"x402gw.stage.{stage.name}"

    async def __call__(self, ctx: RequestContext) -> Response | None:
        with self._tracer.start_as_current_span(self._span_name) as span:
            answer = await self.inner(ctx)
            if answer is not None:
                span.set_attribute("x402gw.answered", answer.status_code)
            return answer


class _TracedFinalizer:
    def __init__(self, finalizer: Finalizer, tracer: Tracer) -> None:
        self.inner = finalizer
        self.name = finalizer.name
        self._tracer = tracer
        self._span_name = f"x402gw.finalizer.{finalizer.name}"

    async def __call__(self, ctx: RequestContext) -> None:
        with self._tracer.start_as_current_span(self._span_name):
            await self.inner(ctx)
