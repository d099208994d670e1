"""Per-request state shared by the pipeline stages: one object, filled in as the request moves."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from catalog import Tool
from settlement.wire import PaymentPayload, SettleResponse


@dataclass
class RequestContext:
    method: str
    path: str
    query: str
    client: str | None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
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
