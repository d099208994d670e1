"""The chain: every stage of a request, in order, written once (``build_chain``), and its runner.

    route ─▶ header_limits ─▶ body ─▶ arguments ─▶ offer ─▶ pre_challenge_safety ─▶ user_auth ─▶ challenge
    404/405   431              413     400/422                503/429                401/403/503  402 (unpaid)
      ─▶ reaccess  (a sign-in, no payment: the paid-for answer again, free; it always answers)
         200 / 402 / 403 / 429 / 502 / 503
      ─▶ decode_and_bind ─▶ wallet_check ─▶ payer_checks ─▶ in_flight ─▶ exactly_once ─▶ payment_window
         400/402             402/503        403/429         409          replay/409/502/503  402
      ─▶ verify ─▶ linked_account
         402/503    403
      ─▶ reserve ─▶ record ─▶ settle_upfront ─▶ bridge ─▶ meter ─▶ answer ─▶ relay ─▶ settle ─▶ respond
         403         409       402/503            502/504   502      502      stream    402/503

    finally, always: release_holds ─▶ audit ─▶ observers ─▶ access_log

With OpenTelemetry on (``gateway.pipeline.tracing``), the request, each stage, each finalizer and
each upstream attempt is a span; off, the chain is exactly the one below.

Like an Envoy filter chain: each stage (``gateway.pipeline.context.Stage``) reads and writes the
one per-request ``RequestContext`` and either passes it on (returns None) or answers (returns a
response, or raises a ``GatewayError``); one stage (``bridge``) talks to the upstream for a payment,
and ``reaccess`` calls the same bridge for the one request no payment stage runs for: a free
re-access of a ``match: tool`` tool (``gateway.pipeline.stages.reaccess``).
The unpaid fast path (``gateway.pipeline.fastpath``) runs this same chain up to ``challenge``:
the stages marked ``shape_only`` once per distinct request (kept with the 402 they lead to),
the others on every request.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from starlette.responses import Response

from catalog import Router
from gateway.errors import GatewayError
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import Finalizer, Observer, RequestContext, Stage
from gateway.pipeline.finalizers import (
    AccessLog,
    AuditTrailWrite,
    Observe,
    ReleaseHolds,
)
from gateway.pipeline.refunds import Refunds
from gateway.pipeline.stages.answer import CheckAnswer
from gateway.pipeline.stages.arguments import Arguments, Body
from gateway.pipeline.stages.bridge import CallUpstream
from gateway.pipeline.stages.challenge import Challenge, OfferStage
from gateway.pipeline.stages.decode import DecodeAndBind, WalletCheck
from gateway.pipeline.stages.exactly_once import (
    ExactlyOnce,
    InFlight,
    store_unavailable,
)
from gateway.pipeline.stages.meter import Meter
from gateway.pipeline.stages.reaccess import Reaccess
from gateway.pipeline.stages.relay import Relay
from gateway.pipeline.stages.respond import Respond
from gateway.pipeline.stages.route import Route
from gateway.pipeline.stages.safety import (
    HeaderLimits,
    PayerChecks,
    PreChallengeSafety,
    Reserve,
)
from gateway.pipeline.stages.settle import Settle, SettleUpfront
from gateway.pipeline.stages.user_auth import LinkedAccountStage, UserAuthStage
from gateway.pipeline.stages.verify import PaymentWindow, Record, Verify
from gateway.pipeline.tracing import Tracing
from gateway.protocol.challenge import PaymentChallenge
from gateway.safety.checks import Safety
from gateway.store import StateStore, StoreUnavailable
from gateway.upstream.bridge import Bridge, UpstreamClient
from gateway.upstream.user_auth import UserAuthority
from settlement.audit import AuditSink
from settlement.chain.head_clock import HeadClock
from settlement.errors import LedgerError
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import Ledger
from settlement.schemes import Schemes
from settlement.schemes.signatures import SignerCheck
from settlement.schemes.wallets import WalletSignatures

__all__ = ["CachedChallenge", "Chain", "build_chain"]

log = logging.getLogger("x402gw.pipeline")


class CachedChallenge(Protocol):
    """The fast path's copy of the 402 that ``challenge`` renders for one request shape."""

    @property
    def code(self) -> str: ...  # the 402's reason

    def response(self, request_id: str) -> Response: ...


class Chain:
    def __init__(self, stages: Sequence[Stage], finalizers: Sequence[Finalizer], tracing: Tracing | None = None) -> None:
        names = [stage.name for stage in stages]
        at = names.index(Challenge.name)
        challenge = stages[at]
        assert isinstance(challenge, Challenge)
        # With tracing, each stage and finalizer is wrapped in its span once, here: without it the
        # chain is the very one written in build_chain, and ``answer`` tests ``tracing`` once.
        self.tracing = tracing
        self.stages = tuple(stages) if tracing is None else tuple(tracing.stage(stage) for stage in stages)
        self.finalizers = tuple(finalizers) if tracing is None else tuple(tracing.finalizer(f) for f in finalizers)
        assert not any(stage.shape_only for stage in self.stages[at:]), "a shape-only stage after the 402"
        self.challenge = challenge
        # The unpaid prefix, split the way the fast path runs it.
        self.shape_stages = tuple(stage for stage in self.stages[:at] if stage.shape_only)
        self.live_stages = tuple(stage for stage in self.stages[:at] if not stage.shape_only)
        self.paid_stages = self.live_stages + self.stages[at:]  # a paid call whose shape the fast path kept

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    async def answer(self, ctx: RequestContext, stages: Coroutine[Any, Any, Response]) -> Response:
        """Run ``stages`` (``run``, or the fast path's ``run_cached``): a refusal becomes its answer;
        then, always, the finalizers run, in order, each whatever the others did."""
        if self.tracing is not None:
            return await self.tracing.request(ctx, lambda: self._answer(ctx, stages))
        return await self._answer(ctx, stages)

    async def _answer(self, ctx: RequestContext, stages: Coroutine[Any, Any, Response]) -> Response:
        response: Response | None = None
        try:
            response = await stages
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer; _refusal logs the unexpected
            response = _refusal(ctx, exc)
        finally:
            ctx.status = response.status_code if response is not None else None  # None: cancelled
            # A relayed stream (stage ``relay``) is not over yet: its finalizers run when it is.
            defer = getattr(response, "defer_finalizers", None)
            if defer is not None:
                defer(lambda: self._finalize(ctx))
            else:
                await self._finalize(ctx)
        assert response is not None  # every branch above answers, or the exception goes on
        return response

    async def _finalize(self, ctx: RequestContext) -> None:
        for finalizer in self.finalizers:
            try:
                await finalizer(ctx)
            except Exception:  # each guards itself; this keeps the next ones running regardless
                log.exception("finalizer %s failed on request %s", finalizer.name, ctx.request_id)

    async def run(self, ctx: RequestContext) -> Response:
        return await _through(self.stages, ctx)

    async def run_shape(self, ctx: RequestContext) -> PaymentChallenge | None:
        """The unpaid prefix's shape-only stages (a refusal raises); then the 402 they lead to, or
        None when a stage answers otherwise."""
        for stage in self.shape_stages:
            if await stage(ctx) is not None:
                return None
        if ctx.compiled is not None and ctx.compiled.tool.reaccess is not None:
            return None  # its 402 carries a fresh sign-in challenge (nonce, issuedAt): never kept
        return self.challenge.unpaid(ctx)

    async def run_paid(self, ctx: RequestContext) -> Response:
        """The chain for a paid call whose shape-only stages' results are already in ``ctx``."""
        return await _through(self.paid_stages, ctx)

    async def run_cached(self, ctx: RequestContext, cached: CachedChallenge) -> Response:
        """The unpaid prefix for a request whose shape-only stages' results are already in ``ctx``."""
        for stage in self.live_stages:
            answer = await stage(ctx)
            if answer is not None:
                return answer
        return self.challenge.issue(ctx, cached.code, cached.response(ctx.request_id))


async def _through(stages: Sequence[Stage], ctx: RequestContext) -> Response:
    for stage in stages:
        answer = await stage(ctx)
        if answer is not None:
            return answer
    raise AssertionError("the chain ended without an answer")  # ``respond`` always answers


def _refusal(ctx: RequestContext, exc: Exception) -> Response:
    """The answer to a stage that raised: its own for a ``GatewayError``; for broken
    infrastructure, a code and a next step, never the exception's text."""
    if isinstance(exc, GatewayError):
        refusal = exc
    elif isinstance(exc, LedgerError):
        log.error("ledger failure on request %s: %s", ctx.request_id, exc.message)
        ctx.reason = exc.code
        return GatewayError("ledger_unavailable", "the payment ledger is unavailable; retry later", retryAfter=2).to_response()
    elif isinstance(exc, StoreUnavailable) and ctx.locks:
        refusal = store_unavailable()  # under the in-flight lock: the store's 503, as its holder says
    else:
        log.error("unexpected failure on request %s", ctx.request_id, exc_info=exc)
        refusal = GatewayError("internal_error", "the gateway failed on this request", requestId=ctx.request_id)
    ctx.reason = refusal.code
    return refusal.to_response()


def build_chain(
    *,
    router: Router,
    tools: Mapping[str, CompiledTool],
    safety: Safety,
    store: StateStore,
    ledger: Ledger,
    schemes: Schemes,
    signers: SignerCheck,
    refunds: Refunds,
    bridge: Bridge,
    upstream: UpstreamClient,
    audit: AuditSink,
    observers: Sequence[Observer],
    public_url: str | None,
    challenge_body_version: int,
    max_body_bytes: int,
    max_upstream_response_bytes: int,
    lock_ttl_ms: int,
    wallets: WalletSignatures | None = None,
    receipts: ReceiptSigner | None = None,
    users: UserAuthority | None = None,
    tracing: Tracing | None = None,
    clocks: Mapping[str, HeadClock] | None = None,
) -> Chain:
    """The order of a request, written once. ``tests/gateway/pipeline/test_chain.py`` holds it."""
    users = users if users is not None else UserAuthority(compiled.tool for compiled in (tools or {}).values())
    return Chain(
        [
            Route(router, tools),
            HeaderLimits(safety),
            Body(max_body_bytes),
            Arguments(),
            OfferStage(public_url, challenge_body_version),
            PreChallengeSafety(safety),
            UserAuthStage(users),  # a user-scoped tool: the end user's OAuth token, before any 402
            Challenge(),
            # a sign-in to a tool with re-access (and no payment): answered here, free, or a 402
            Reaccess(ledger=ledger, store=store, safety=safety, bridge=bridge, upstream=upstream,
                     max_response_bytes=max_upstream_response_bytes, wallets=wallets, users=users),
            # with a payment from here on
            DecodeAndBind(signers, wallets, schemes),  # offline signer recovery: before any limit or lookup keyed on the payer
            WalletCheck(wallets),  # a contract wallet's signature, on chain (one capped eth_call); EOAs: nothing
            PayerChecks(safety),
            InFlight(store, lock_ttl_ms),
            ExactlyOnce(ledger, schemes, refunds, receipts, public_url),
            PaymentWindow(clocks),  # fresh payments only (a resend was answered by exactly_once); the chain's clock
            Verify(schemes),
            LinkedAccountStage(users),  # a wallet_accounts tool: the verified payer's account, before anything is recorded
            Reserve(safety),
            Record(ledger),
            SettleUpfront(schemes, ledger),
            CallUpstream(bridge, upstream, safety=safety, ledger=ledger, refunds=refunds,
                         max_response_bytes=max_upstream_response_bytes, users=users),
            Meter(ledger),  # an upto tool charged by usage: the units its answer reports, priced and capped
            CheckAnswer(ledger, refunds),  # drift against output_schema (fail: withheld), then trimming as asked
            Relay(schemes, ledger, max_upstream_response_bytes),  # a stream: relayed as it comes, settled when it ends
            Settle(schemes, ledger),
            Respond(ledger, receipts, public_url),
        ],
        [ReleaseHolds(store, safety, ledger), AuditTrailWrite(audit), Observe(observers), AccessLog()],
        tracing,
    )
