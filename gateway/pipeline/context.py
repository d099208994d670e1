"""Per-request state shared by the pipeline stages: one object, filled in as the request moves."""

from __future__ import annotations

import time
import itertools
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from catalog import Tool
from settlement.audit.trail import AuditEvent
from settlement.x402.wire import PaymentPayload, SettleResponse


# Request ids: a random 64-bit prefix per process and a counter, 32 hex chars like a uuid4's hex,
# unique across replicas without uuid4's os.urandom call per request.
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


@dataclass
class RequestContext:
    method: str
    path: str
    query: str
    client: str | None
    request_id: str = field(default_factory=lambda: new_request_id())
    started: float = field(default_factory=time.perf_counter)
    tool: Tool | None = None
    params: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    payload: PaymentPayload | None = None
    payer: str | None = None
    payment_id: int | None = None
    settlement: SettleResponse | None = None
    upstream_status: int | None = None
    status: int | None = None
    outcome: str = "received"
    reason: str | None = None
    # What the safety stage holds for this request (budget reservations, breaker probe).
    safety: Any = None
    # A payment header came with the request (the funnel's "payment received").
    payment_received: bool = False
    # Seconds spent in the stages that wait on the network: "verify", "upstream", "settle".
    timings: dict[str, float] = field(default_factory=dict)
    # Decisions taken on this request, in order: chained into the audit trail at the end.
    events: list[AuditEvent] = field(default_factory=list)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def record(self, event: str, **fields: Any) -> None:
        """Note a decision for the audit trail: a stable snake_case ``event`` and JSON-able fields
        (never headers or credentials; URLs lose query and userinfo). Request id, payer and tool
        are added when the request ends."""
        self.events.append(AuditEvent(self.request_id, event, fields))


class Observer(Protocol):
    """Told of every finished request (metrics, accounting); must be cheap and must not raise."""

    def on_outcome(self, ctx: RequestContext) -> None: ...
