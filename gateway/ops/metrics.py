"""Prometheus metrics: the payment funnel and per-stage latency, served at ``GET /metrics``.

An observer of the pipeline: it reads the finished request's context (outcome, reason, timings)
once, in the pipeline's ``finally``, and never touches the request. Each app owns its registry, so
many apps (tests, several gateways in one process) never share or collide on counters.

Funnel, per tool::

    402 issued ─▶ payment received ─▶ verified ─▶ upstream ok ─▶ settled
                        └▶ rejected{reason}   └▶ upstream failed  ├▶ failed
                                                                   └▶ pending
    refunds: owed / refunded (upfront tools whose upstream failed after settlement)
    schema drift: x402gw_upstream_schema_drift{tool, handling} (answers not matching output_schema)

Dependencies (``watch_dependencies``): ``x402gw_dependency_up{kind, network, position, url}`` is 1
while an RPC URL or a facilitator answered its last call, 0 when it failed or has not been used
yet (``x402gw_dependency_failures``: consecutive failures of an RPC URL). URLs are redacted to
scheme and host; ``position`` is the URL's place in its network's failover order.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from gateway.pipeline.context import RequestContext

__all__ = ["GatewayMetrics", "ToolCounts"]

STAGES = ("verify", "upstream", "settle")
# Network waits: a local verify is sub-millisecond, a settlement waits for a block.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PENDING_REASONS = frozenset({"settlement_pending", "settlement_unknown"})
# Outcomes reached only after the facilitator said the payment is valid.
VERIFIED_OUTCOMES = frozenset(
    {"verified", "settling", "settled", "upstream_error", "upstream_failed", "refund_owed", "refunded"}
)
# Reason codes come partly from remote facilitators: keep the label set small and well-formed.
MAX_REASONS = 64
_REASON = re.compile(r"[a-z0-9_]{1,64}")


class DependencyCollector(Collector):
    """Reads the per-URL health at each scrape (``SchemeWiring.health``'s shape)."""

    def __init__(self, source: Callable[[], Mapping[str, Mapping[str, list[Mapping[str, Any]]]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["kind", "network", "position", "url"]
        up = GaugeMetricFamily("x402gw_dependency_up", "1 when the RPC URL or facilitator answered its last call", labels=labels)
        failures = GaugeMetricFamily("x402gw_dependency_failures", "Consecutive failures of an RPC URL", labels=labels)
        for kind, networks in self.source().items():
            for network, entries in networks.items():
                for position, entry in enumerate(entries):
                    values = [kind, network, str(position), str(entry.get("url"))]
                    up.add_metric(values, 1.0 if entry.get("state") == "up" else 0.0)
                    if "failures" in entry:
                        failures.add_metric(values, float(entry["failures"]))
        yield up
        yield failures


@dataclass
class ToolCounts:
    """What the dashboard shows of one tool since this process started."""

    challenges: int = 0
    received: int = 0
    verified: int = 0
    rejected: int = 0
    upstream_ok: int = 0
    upstream_failed: int = 0
    schema_drift: int = 0  # answers off the tool's output_schema (pass and fail alike)
    settled: int = 0
    failed: int = 0
    pending: int = 0
    refund_owed: int = 0
    refunded: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("x402gw_requests", "Requests answered, by outcome", ["outcome"], registry=r)
        self.challenges = Counter("x402gw_challenges", "402 offers issued to unpaid calls", ["tool"], registry=r)
        self.received = Counter("x402gw_payments_received", "Calls that carried a payment", ["tool"], registry=r)
        self.verified = Counter("x402gw_payments_verified", "Payments the facilitator verified", ["tool"], registry=r)
        self.rejected = Counter(
            "x402gw_payments_rejected", "Payments refused before the upstream, by reason", ["tool", "reason"], registry=r
        )
        self.replayed = Counter(
            "x402gw_payments_replayed", "Resent payments answered from the ledger", ["tool"], registry=r
        )
        self.upstream = Counter("x402gw_upstream_calls", "Upstream calls, ok or failed", ["tool", "result"], registry=r)
        self.settlements = Counter(
            "x402gw_settlements", "Settlement outcomes: settled, failed or pending", ["tool", "result"], registry=r
        )
        self.refunds = Counter("x402gw_refunds", "Refunds after settlement: owed or refunded", ["tool", "state"], registry=r)
        self.revenue = Counter(
            "x402gw_revenue_atomic", "Settled amount in the asset's atomic units", ["tool", "asset"], registry=r
        )
        self.drift = Counter(
            "x402gw_upstream_schema_drift", "Upstream answers that did not match the tool's output_schema, by handling",
            ["tool", "handling"], registry=r,
        )
        self.stage_seconds = Histogram(
            "x402gw_stage_seconds", "Time spent per stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self._stage = {stage: self.stage_seconds.labels(stage=stage) for stage in STAGES}
        self._reasons: set[str] = set()
        self._lock = threading.Lock()
        # The labelled children on the per-request path, by metric and label values (``_child``).
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}

    def _child(self, metric: Counter, *values: str) -> Counter:
        """``metric.labels(*values)``, kept: ``labels()`` takes a lock and builds a key on every call.
        The values are bounded (outcomes, tools and assets of the catalog, fixed results, reasons
        capped by ``_reason``)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def watch_dependencies(self, source: Callable[[], Mapping[str, Mapping[str, list[Mapping[str, Any]]]]]) -> None:
        """Export the per-URL state of the RPC endpoints and facilitators at every scrape."""
        self.registry.register(DependencyCollector(source))

    def _reason(self, reason: str | None) -> str:
        reason = reason or "unknown"
        if reason in self._reasons:
            return reason
        if not _REASON.fullmatch(reason):
            return "other"
        with self._lock:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(reason)
        return reason

    def on_outcome(self, ctx: RequestContext) -> None:
        outcome = ctx.outcome
        self._child(self.requests, outcome).inc()
        for stage, seconds in ctx.timings.items():
            histogram = self._stage.get(stage)
            if histogram is not None:
                histogram.observe(seconds)
        if ctx.tool is None:
            return  # not a tool (404 and the like): counted by outcome only
        tool = ctx.tool.name
        if outcome == "challenged":
            self._child(self.challenges, tool).inc()
            return
        if not ctx.payment_received:
            return
        if ctx.drift is not None:
            self._child(self.drift, tool, ctx.drift).inc()
        self._child(self.received, tool).inc()
        if outcome == "replayed":
            self._child(self.replayed, tool).inc()
            return
        if outcome not in VERIFIED_OUTCOMES:
            self._child(self.rejected, tool, self._reason(ctx.reason)).inc()
            return
        self._child(self.verified, tool).inc()
        if outcome == "verified" and ctx.reason is not None:
            # Verified, then stopped before the upstream (a budget, a breaker, a payment in flight).
            self._child(self.rejected, tool, self._reason(ctx.reason)).inc()
        if "upstream" in ctx.timings:
            # 3xx counts as failed: the pipeline neither follows nor settles a redirect.
            ok = ctx.upstream_status is not None and ctx.upstream_status < 300
            self._child(self.upstream, tool, "ok" if ok else "failed").inc()
        if ctx.settlement is not None and ctx.settlement.success:
            self._child(self.settlements, tool, "settled").inc()
            if ctx.payload is not None:
                self._child(self.revenue, tool, ctx.payload.accepted.asset).inc(int(ctx.payload.accepted.amount))
        elif "settle" in ctx.timings:
            pending = ctx.reason in PENDING_REASONS
            self._child(self.settlements, tool, "pending" if pending else "failed").inc()
        if outcome == "refund_owed":
            self._child(self.refunds, tool, "owed").inc()
        elif outcome == "refunded":
            self._child(self.refunds, tool, "refunded").inc()

    def per_tool(self) -> dict[str, ToolCounts]:
        """The funnel counters by tool, read back from the registry (for the dashboard)."""
        tools: dict[str, ToolCounts] = {}

        def counts(tool: str) -> ToolCounts:
            return tools.setdefault(tool, ToolCounts())

        simple = {
            "x402gw_challenges_total": "challenges",
            "x402gw_payments_received_total": "received",
            "x402gw_payments_verified_total": "verified",
        }
        for family in self.registry.collect():
            for sample in family.samples:
                tool = sample.labels.get("tool")
                if tool is None or not sample.name.endswith("_total"):
                    continue
                value = int(sample.value)
                if sample.name in simple:
                    setattr(counts(tool), simple[sample.name], value)
                elif sample.name == "x402gw_payments_rejected_total":
                    entry = counts(tool)
                    entry.rejected += value
                    entry.rejected_by_reason[sample.labels["reason"]] = value
                elif sample.name == "x402gw_upstream_calls_total":
                    attr = "upstream_ok" if sample.labels["result"] == "ok" else "upstream_failed"
                    setattr(counts(tool), attr, value)
                elif sample.name == "x402gw_settlements_total":
                    setattr(counts(tool), sample.labels["result"], value)
                elif sample.name == "x402gw_upstream_schema_drift_total":
                    counts(tool).schema_drift += value
                elif sample.name == "x402gw_refunds_total":
                    attr = "refunded" if sample.labels["state"] == "refunded" else "refund_owed"
                    setattr(counts(tool), attr, value)
        return tools

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
