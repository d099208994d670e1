"""What runs after every request, in this order, whatever its stages did (``Pipeline.answer``'s
``finally``): the holds given back, the audit trail, the observers, the access log. None of them
raises: a request's answer never depends on its bookkeeping."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from gateway.pipeline.context import Observer, RequestContext
from gateway.pipeline.stages.audit import audit_events
from gateway.pipeline.stages.exactly_once import discard_early_verify, release
from gateway.safety.checks import Safety
from gateway.store import StateStore
from settlement.audit import AuditSink
from settlement.ledger import Ledger

__all__ = ["AccessLog", "AuditTrailWrite", "Observe", "ReleaseHolds"]

access_log = logging.getLogger("x402gw.audit")
log = logging.getLogger("x402gw.pipeline")


class ReleaseHolds:
    """In-flight locks, a verify no longer wanted, then the safety stage's holds (budgets back
    unless money moved; the breaker's probe)."""

    name = "release_holds"

    def __init__(self, store: StateStore, safety: Safety, ledger: Ledger) -> None:
        self.store = store
        self.safety = safety
        self.ledger = ledger

    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.paid is not None:
            discard_early_verify(ctx)
        if ctx.locks:
            await release(self.store, ctx)
        await self.safety.finish(ctx, self.ledger)


class AuditTrailWrite:
    name = "audit"

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink

    async def __call__(self, ctx: RequestContext) -> None:
        try:
            self.sink.submit(audit_events(ctx))
        except Exception:  # the trail logs what it cannot write; a request's answer never depends on it
            log.exception("audit trail submit failed on request %s", ctx.request_id)


class Observe:
    name = "observers"

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = observers  # the pipeline's list: observers added after start-up are told too

    async def __call__(self, ctx: RequestContext) -> None:
        for observer in self.observers:
            try:
                observer.on_outcome(ctx)
            except Exception:  # an observer must never change a request's answer
                log.exception("observer %r failed on request %s", observer, ctx.request_id)


class AccessLog:
    name = "access_log"

    async def __call__(self, ctx: RequestContext) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        record = {
            "requestId": ctx.request_id,
            "method": ctx.method,
            "path": ctx.path,
            "tool": ctx.tool.name if ctx.tool else None,
            "payer": ctx.payer,
            "outcome": ctx.outcome,
            "reason": ctx.reason,
            "upstreamStatus": ctx.upstream_status,
            "transaction": ctx.settlement.transaction if ctx.settlement else None,
            "ms": round((time.perf_counter() - ctx.started) * 1000, 2),
        }
        access_log.info(json.dumps(record, separators=(",", ":")))
