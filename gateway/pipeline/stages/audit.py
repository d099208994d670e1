"""Audit, in ``finally``: turn what a request decided into records for the hash-chained trail.

Stages note decisions as they take them (``ctx.record(event, **fields)``); the upstream seam is
wrapped so every attempt, retries and failovers included, is noted without the bridge knowing.
At the end the terminal decisions (payment rejected, settlement failed, replayed, the response)
are added from the context, every event is stamped with request id, payer and tool, and the batch
goes to the audit sink in one piece. Never stops a request; never sees headers or query strings.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.upstream.bridge import UpstreamClient, UpstreamResponse
from settlement.audit import AuditEvent, redact_url


class RecordingUpstream:
    """An ``UpstreamClient`` that notes each attempt of one request: URL (no query, no userinfo),
    method, status or error code, latency and attempt number (0 is the first try)."""

    def __init__(self, client: UpstreamClient, ctx: RequestContext) -> None:
        self._client = client
        self._ctx = ctx
        self._attempts = 0

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        return await self._attempt(self._client.send, method, url, headers, body, timeout, max_bytes)

    async def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        return await self._attempt(self._client.open, method, url, headers, body, timeout, max_bytes)

    async def _attempt(
        self, call: Callable[..., Awaitable[UpstreamResponse]],
        method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int,
    ) -> UpstreamResponse:
        attempt = self._attempts
        self._attempts += 1
        started = time.perf_counter()
        redacted = redact_url(url)
        fields: dict[str, object] = {"method": method, "url": redacted, "attempt": attempt}
        tracing = self._ctx.tracing
        try:
            if tracing is None:
                response = await call(method, url, headers, body, timeout, max_bytes)
            else:  # a span of its own, its traceparent sent upstream and noted for the trail
                headers = dict(headers)
                with tracing.upstream_attempt(method, redacted, attempt, headers) as span:
                    fields["traceparent"] = headers.get("traceparent")
                    response = await call(method, url, headers, body, timeout, max_bytes)
                    span.set_attribute("http.response.status_code", response.status)
        except GatewayError as err:
            fields["error"] = err.code
            raise
        else:
            fields["status"] = response.status
            return response
        finally:
            fields["latencyMs"] = round((time.perf_counter() - started) * 1000, 3)
            self._ctx.record("upstream_attempt", **fields)

    async def close(self) -> None:
        await self._client.close()


MAX_AUDITED_PATH = 512  # characters of a request's path kept in its audit record (a tool's are far shorter)


def audit_events(ctx: RequestContext) -> list[AuditEvent]:
    """The request's events, terminal decisions added, each stamped with payer and tool."""
    noted = {item.event for item in ctx.events}
    # A stage that recorded its own refusal (e.g. a safety verdict with reason=<code>) said it all.
    refusal_noted = ctx.reason is not None and any(item.fields.get("reason") == ctx.reason for item in ctx.events)
    common = {"paymentId": ctx.payment_id} if ctx.payment_id is not None else {}
    if ctx.outcome == "replayed":
        ctx.record("payment_replayed", **common)
    elif refusal_noted:
        pass
    elif ctx.payment_received and "payment_verified" not in noted and ctx.reason is not None:
        ctx.record("payment_rejected", reason=ctx.reason)
    elif ctx.outcome == "settling" and ctx.reason is not None:
        ctx.record("settlement_failed", reason=ctx.reason, **common)
    path = ctx.path if len(ctx.path) <= MAX_AUDITED_PATH else ctx.path[:MAX_AUDITED_PATH] + f"...({len(ctx.path)} chars)"
    ctx.record(
        "response",
        method=ctx.method,
        path=path,  # bounded: a free request's 80 KB path must not become a permanent 80 KB record
        status=ctx.status,
        outcome=ctx.outcome,
        reason=ctx.reason,
        upstreamStatus=ctx.upstream_status,
        latencyMs=round((time.perf_counter() - ctx.started) * 1000, 3),
        **common,
        **({"traceparent": ctx.traceparent} if ctx.traceparent is not None else {}),
    )
    tool = ctx.tool.name if ctx.tool else None
    payer = ctx.payer
    # A constructor call, not dataclasses.replace: the same event at a fraction of the cost.
    return [AuditEvent(item.request_id, item.event, item.fields, payer, tool, item.at) for item in ctx.events]
