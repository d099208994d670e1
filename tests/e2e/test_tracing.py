"""OpenTelemetry (issue 21 item 3) on the real stack: a gateway on loopback, anvil, a recording
upstream. Spans are caught with the SDK's in-memory exporter: one request span, a span per stage
under it in chain order, a span per upstream attempt under the bridge stage; the upstream gets
each attempt's ``traceparent`` (same trace), and the audit trail records them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.pipeline.chain import Chain
from gateway.pipeline.tracing import Tracing, tracing_from_env
from settlement.audit import AuditTrail, AuditWriter
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_paid_call import pay
from tests.support.attack_stack import ATTACK_CATALOG
from tests.support.recording_upstream import RecordingUpstream

PAYER = 7
CATALOG_TAIL = """
  - name: flaky_quote
    description: A paid read whose upstream fails once, then answers
    method: GET
    path: /flaky/{{symbol}}
    upstream: again
    upstream_path: /u/flaky_quote/{{symbol}}
    price: "0.002"
    input_schema: *symbol
"""


@pytest.fixture
def recording() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def traced(start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream,
           tmp_path: Path) -> Iterator[tuple[RunningGateway, InMemorySpanExporter, AuditWriter]]:
    catalog = ATTACK_CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=recording.url)
    catalog = catalog.replace(
        "upstreams:\n",
        f'upstreams:\n  again: {{base_url: "{recording.url}", timeout_seconds: 5, '
        "retry: {attempts: 2, backoff_seconds: 0.01}}\n",
    )
    path = tmp_path / "traced.yaml"
    path.write_text(catalog + CATALOG_TAIL.format())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    database_url = f"sqlite:///{tmp_path / 'traced.sqlite3'}"
    writer = AuditWriter(AuditTrail(database_url))
    gateway = start_gateway(path, database_url=database_url,
                            app_options={"tracing": Tracing.from_provider(provider), "audit": writer})
    yield gateway, exporter, writer


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The request span with this request id, and every span of its trace."""
    finished = exporter.get_finished_spans()
    [root] = [s for s in finished if s.name == "x402gw.request" and s.attributes["x402gw.request_id"] == request_id]
    return root, [s for s in finished if s.context.trace_id == root.context.trace_id]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.start_time or 0)


def traceparent_of(span: ReadableSpan) -> str:
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{int(span.context.trace_flags):02x}"


def test_a_paid_call_is_a_trace_of_its_stages_and_upstream_attempts(
    traced: tuple[RunningGateway, InMemorySpanExporter, AuditWriter], devchain: Devchain, recording: RecordingUpstream
) -> None:
    gateway, exporter, writer = traced
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/flaky/ACME", payer=PAYER)
    assert paid.status_code == 200, paid.text
    request_id = paid.headers["x-request-id"]
    root, spans = spans_of(exporter, request_id)
    assert root.parent is None and root.kind == SpanKind.SERVER
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["x402gw.tool"] == "flaky_quote" and root.attributes["x402gw.outcome"] == "settled"
    stages = [s.name for s in children(spans, root)]
    names = gateway_stage_names(gateway)
    assert stages == [f"x402gw.stage.{n}" for n in names] + [
        "x402gw.finalizer.release_holds", "x402gw.finalizer.audit", "x402gw.finalizer.observers",
        "x402gw.finalizer.access_log",
    ]
    assert {"x402gw.stage.verify", "x402gw.stage.record", "x402gw.stage.bridge", "x402gw.stage.settle"} <= set(stages)
    [bridge] = [s for s in children(spans, root) if s.name == "x402gw.stage.bridge"]
    attempts = children(spans, bridge)
    assert [(s.name, s.kind, s.attributes["x402gw.attempt"], s.attributes["http.response.status_code"])
            for s in attempts] == [
        ("x402gw.upstream.attempt", SpanKind.CLIENT, 0, 503), ("x402gw.upstream.attempt", SpanKind.CLIENT, 1, 200),
    ]
    assert attempts[0].attributes["url.full"] == f"{recording.url}/u/flaky_quote/ACME"
    # The upstream got each attempt's traceparent: this trace, the attempt's own span as parent.
    calls = [c for c in recording.snapshot() if c.request_id == request_id]
    assert [c.headers["traceparent"] for c in calls] == [traceparent_of(s) for s in attempts]
    # The audit trail names them: each attempt's traceparent, and the request's on the response.
    assert writer.drain(30)
    records = writer.trail.for_request(request_id)
    sent = [json.loads(r.data)["traceparent"] for r in records if r.event == "upstream_attempt"]
    assert sent == [traceparent_of(s) for s in attempts]
    [response] = [json.loads(r.data) for r in records if r.event == "response"]
    assert response["traceparent"] == traceparent_of(root)


def gateway_stage_names(gateway: RunningGateway) -> list[str]:
    """The declared order of this gateway's chain (an app built from the same settings, not served)."""
    app = create_app(gateway.settings, catalogs=gateway.catalogs, ledger=gateway.ledger)
    names: list[str] = app.state.pipeline.chain.names
    return names


def test_a_client_traceparent_is_the_request_span_parent_and_refusals_are_traced(
    traced: tuple[RunningGateway, InMemorySpanExporter, AuditWriter],
) -> None:
    gateway, exporter, _ = traced
    incoming = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with gateway.client() as client:
        unpaid = client.get("/q/ACME", headers={"traceparent": incoming})
    assert unpaid.status_code == 402
    root, spans = spans_of(exporter, unpaid.headers["x-request-id"])
    assert f"{root.context.trace_id:032x}" == "ab" * 16
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "cd" * 8
    assert root.attributes["http.response.status_code"] == 402
    # The unpaid fast path: the live stages of the prefix (its 402 is cached per request shape), then
    # the finalizers, every one a child of the request span.
    names = [s.name for s in children(spans, root)]
    assert names[-4:] == ["x402gw.finalizer.release_holds", "x402gw.finalizer.audit", "x402gw.finalizer.observers",
                          "x402gw.finalizer.access_log"]
    assert names[:-4] and all(name.startswith("x402gw.stage.") for name in names[:-4])
    assert not any(s.name == "x402gw.upstream.attempt" for s in spans)


def test_off_without_otel_environment_and_on_with_it() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_SERVICE_NAME": "x402gw"}) is None
    assert tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}) is None
    for environ in ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
                    {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
                    {"OTEL_TRACES_EXPORTER": "otlp"}):
        tracing = tracing_from_env(environ)
        assert isinstance(tracing, Tracing)
        tracing.shutdown()


def test_without_tracing_the_chain_is_the_declared_one(gateway: RunningGateway) -> None:
    # No OTEL_* environment here: no wrapper around any stage or finalizer, no tracing on the chain.
    chain = create_app(gateway.settings, catalogs=gateway.catalogs, ledger=gateway.ledger).state.pipeline.chain
    assert isinstance(chain, Chain) and chain.tracing is None
    assert all(type(stage).__module__.startswith("gateway.pipeline.stages.") for stage in chain.stages)
    assert all(type(finalizer).__module__ == "gateway.pipeline.finalizers" for finalizer in chain.finalizers)
