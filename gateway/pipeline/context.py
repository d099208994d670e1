"""Per-request state shared by the stages: one object, filled in as the request moves down the chain.

``RequestContext`` is what every request has (from the route on); ``Paid`` is what a request with a
payment adds, set by the ``decode_and_bind`` stage, so the stages after it read typed, non-optional
fields. The vocabulary of the chain (``Stage``, ``Finalizer``, ``Observer``) is here too.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from catalog import Tool
from gateway.protocol.offers import Quote
from gateway.upstream.bridge import UpstreamResponse
from gateway.upstream.trimming import AnswerRequest
from gateway.upstream.user_auth import UserToken
from settlement.audit import AuditEvent
from settlement.x402.wire import (
    ExactEvmPayload,
    PaymentPayload,
    SettleResponse,
    VerifyResponse,
)

if TYPE_CHECKING:
    from gateway.pipeline.compiled import CompiledTool
    from settlement.ledger import Payment
    from settlement.schemes.wallets import WalletSignature

__all__ = ["Finalizer", "Observer", "Paid", "RequestContext", "Stage", "new_request_id"]

# Request ids: a random 64-bit prefix per process and a counter, 32 hex chars like a uuid4's hex,
# unique across replicas without uuid4's os.urandom call per request.
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


@dataclass
class Paid:
    """A request's payment, once decoded, bound to the offer and its signer recovered offline."""

    payload: PaymentPayload
    exact: ExactEvmPayload
    signer: str  # recovered offline over this offer; the facilitator's verify confirms it on chain
    nonce: str  # lower case
    identifier: str | None  # the client's payment-identifier
    fingerprint: str  # of method, path, query and body: what a replay must match
    # A contract wallet's signature (ERC-1271 / ERC-6492), confirmed on chain by ``wallet_check``
    # before anything is keyed on ``signer`` (then ``signer`` is authorization.from); None: an EOA's.
    wallet: WalletSignature | None = None
    digest: bytes = b""  # the EIP-712 digest the wallet is asked about
    known: Payment | None = None  # the ledger's row for this payment, when it has one
    recorded: Payment | None = None  # the row ``record`` wrote (verified), for a receipt without a read
    # The facilitator's verify, started beside the ledger lookup (exactly_once), awaited by verify.
    early_verify: asyncio.Future[VerifyResponse] | None = None
    early_started: float = 0.0
    verified: VerifyResponse | None = None
    upstream: UpstreamResponse | None = None


@dataclass
class RequestContext:
    method: str
    path: str
    query: str
    client: str | None
    request_id: str = field(default_factory=lambda: new_request_id())
    started: float = field(default_factory=time.perf_counter)
    # The request as the stages read it: the ASGI headers always; the Starlette request when the
    # pipeline runs (the unpaid fast path restores what reading it would give, from its cache).
    raw_headers: Sequence[tuple[bytes, bytes]] = ()
    request: Request | None = None
    tool: Tool | None = None
    compiled: CompiledTool | None = None
    params: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    quote: Quote | None = None
    # A payment header came and will be read (never on HEAD): the stages after the challenge run.
    paying: bool = False
    # The end user's checked OAuth token, for a tool with user_auth (stage ``user_auth``); never logged.
    user: UserToken | None = None
    paid: Paid | None = None
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
    # In-flight locks held in the state store (exactly_once); released by the finalizers.
    locks: tuple[str, ...] = ()
    # The task renewing ``locks`` while the request runs (exactly_once.acquire); cancelled at release.
    lock_keeper: asyncio.Future[None] | None = None
    # A payment header came with the request (the funnel's "payment received").
    payment_received: bool = False
    # Seconds spent in the stages that wait on the network: "verify", "upstream", "settle".
    timings: dict[str, float] = field(default_factory=dict)
    # Decisions taken on this request, in order: chained into the audit trail at the end.
    events: list[AuditEvent] = field(default_factory=list)
    # What the caller asked of the answer (x402gw_* query parameters, read by ``arguments``); None:
    # the answer is served as the upstream gave it.
    answer_request: AnswerRequest | None = None
    # The upstream's answer did not match the tool's output_schema: the tool's handling (pass, fail).
    drift: str | None = None
    # OpenTelemetry, when on (gateway.pipeline.tracing): the tracing itself and the request span's
    # W3C traceparent, recorded in the audit trail.
    tracing: Any = None
    traceparent: str | None = None

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


class Stage(Protocol):
    """One step of the chain (``gateway.pipeline.chain``). Returns None to pass the request on, or
    answers it: by returning a response, or by raising a ``GatewayError`` (its answer)."""

    name: str  # as written in the declared order
    # True when the stage's result depends only on what the unpaid fast path keys a request by
    # (method, path, query, Host; no body, no payment header): the fast path keeps it per key.
    shape_only: bool

    async def __call__(self, ctx: RequestContext) -> Response | None: ...


class Finalizer(Protocol):
    """Runs after every request, whatever its stages did; never raises."""

    name: str

    async def __call__(self, ctx: RequestContext) -> None: ...


class Observer(Protocol):
    """Told of every finished request (metrics, accounting); must be cheap and must not raise."""

    def on_outcome(self, ctx: RequestContext) -> None: ...
