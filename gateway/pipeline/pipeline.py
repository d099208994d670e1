"""What happens to a request, in one place.

    request ─▶ route ─▶ challenge ─▶ verify ─▶ bridge ─▶ settle ─▶ respond
                404/405   413/422/402  400/402/409  502/504   402/503
                    audit record written for every outcome, in ``finally``

Safety (``gateway.safety.checks``) runs between them: header size before the body; kill switch,
price guard, circuit breaker and the per-client rate limit before any 402; payer lists and
per-payer/per-tool rate limits before verify; budgets after verify; their release in ``finally``.

Each stage lives in ``gateway.stages``; this module only orders them and owns the per-request
context, the in-flight lock on (payer, nonce), and the ledger row's life.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jsonschema import Draft202012Validator
from starlette.requests import Request
from starlette.responses import Response

from catalog import Catalogs, Router, Tool, format_amount
from gateway.pipeline.context import Observer, RequestContext
from gateway.errors import GatewayError
from gateway.protocol.offers import Offer, Quote, request_binding
from gateway.pipeline.stages.audit import RecordingUpstream, audit_events
from gateway.upstream.bridge import Bridge, UpstreamClient, UpstreamResponse
from gateway.pipeline.stages.challenge import PaymentChallenge, challenge_issued, collect_arguments, validate_arguments
from gateway.pipeline.stages.exactly_once import (
    in_flight,
    payment_identifier,
    receipt_of,
    request_fingerprint,
    resume,
    same_payment,
)
from gateway.pipeline.stages.respond import respond
from gateway.pipeline.stages.route import route
from gateway.safety.checks import Safety
from gateway.pipeline.stages.settle import receipt_headers, settle
from gateway.pipeline.stages.verify import bind, decode_payment, decode_payment_v1, verify
from gateway.store import MemoryStore, StateStore
from settlement.audit.trail import AuditSink, AuditTrail, AuditWriter
from settlement.chain.client import Chain
from settlement.x402.codec import parse_exact_evm
from settlement.errors import LedgerError, PaymentDecodeError
from settlement.schemes.facilitator import VALID_BEFORE_MARGIN_SECONDS, Facilitator
from settlement.ledger.payments import Ledger, Payment, PaymentState
from settlement.chain.refunds import Refunder
from settlement.schemes.signatures import SignerCheck
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, VerifyResponse

audit_log = logging.getLogger("x402gw.audit")
log = logging.getLogger("x402gw.pipeline")

PAYMENT_HEADER = "payment-signature"
PAYMENT_HEADER_V1 = "x-payment"


@dataclass(frozen=True, eq=False)
class CompiledTool:
    """What a request to one tool needs: its offer, argument validator and price text. Each is built
    on first use and kept, so a catalog of thousands of tools starts without compiling them all
    and the first request to a tool pays its build once. Tools with the same input schema share
    one validator (``validators``, one dict per pipeline)."""

    tool: Tool
    validators: dict[str, Draft202012Validator] = field(default_factory=dict, repr=False)

    @cached_property
    def offer(self) -> Offer:
        return Offer.for_tool(self.tool)

    @cached_property
    def validator(self) -> Draft202012Validator:
        schema = self.tool.input_schema
        key = json.dumps(schema, default=repr)  # in the schema's own key order: errors come in it
        validator = self.validators.get(key)
        if validator is None:
            validator = self.validators[key] = Draft202012Validator(schema)
        return validator

    @cached_property
    def price_text(self) -> str:
        return format_amount(self.tool.price_atomic, self.tool.payment.decimals)


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a side task whose answer is no longer wanted, and never leave its error unread."""
    future.cancel()
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())


class Pipeline:
    def __init__(
        self,
        catalogs: Catalogs,
        facilitator: Facilitator,
        ledger: Ledger,
        upstream: UpstreamClient,
        *,
        public_url: str | None = None,
        max_body_bytes: int = 1_048_576,
        max_upstream_response_bytes: int = 10 * 1_048_576,
        challenge_body_version: int = 2,
        store: StateStore | None = None,
        chains: dict[str, Chain] | None = None,
        refunder: Refunder | None = None,
        write_ahead_networks: set[str] | None = None,
        lock_ttl_ms: int = 180_000,
        bridge: Bridge | None = None,
        audit: AuditSink | None = None,
        safety: Safety | None = None,
    ) -> None:
        self.catalogs = catalogs
        self.router = Router(catalogs.tools)
        validators: dict[str, Draft202012Validator] = {}
        self.tools: dict[str, CompiledTool] = {tool.name: CompiledTool(tool, validators) for tool in catalogs.tools}
        self.facilitator = facilitator
        self.ledger = ledger
        self.upstream = upstream
        # Upstream calls prepared once (credentials, SOAP definitions); create_app passes its own.
        self.bridge = bridge or Bridge(catalogs.tools)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.max_body_bytes = max_body_bytes
        self.max_upstream_response_bytes = max_upstream_response_bytes
        self.challenge_body_version = challenge_body_version
        self.store: StateStore = store or MemoryStore()
        self.chains = chains or {}
        self.refunder = refunder
        # Networks whose facilitator records the tx hash before broadcasting (the local one).
        self.write_ahead_networks = write_ahead_networks or set()
        self.lock_ttl_ms = lock_ttl_ms
        # Limits, policy and circuit breakers (gateway.safety.checks), sharing the state store.
        self.safety = safety or Safety(self.store, catalogs)
        # Offline signature recovery over this gateway's own offers (before any lookup or limit).
        self.signers = SignerCheck()
        # The hash-chained audit trail, in the ledger's database unless told otherwise.
        self.audit: AuditSink = (
            audit if audit is not None else AuditWriter(AuditTrail(ledger.url), executor=ledger.shared_executor)
        )
        # Told of every finished request, in ``_audit`` (metrics): cheap, never raising.
        self.observers: list[Observer] = []

    async def handle(self, request: Request) -> Response:
        url = request.url
        client = request.scope.get("client")
        ctx = RequestContext(method=request.method, path=url.path, query=url.query, client=client[0] if client else None)
        response = await self.answer(ctx, self._run(ctx, request))
        response.headers["X-Request-Id"] = ctx.request_id
        return response

    async def answer(self, ctx: RequestContext, stages: Coroutine[Any, Any, Response]) -> Response:
        """Run a request's stages: a refusal becomes its answer; then, always, the safety stage's
        holds are released and the request is audited and observed. The unpaid fast path
        (``gateway.pipeline.fastpath``) runs its shortened stages through here too."""
        response: Response | None = None
        try:
            response = await stages
        except GatewayError as err:
            ctx.reason = err.code
            response = err.to_response()
        except LedgerError as err:
            log.error("ledger failure on request %s: %s", ctx.request_id, err.message)
            ctx.reason = err.code
            response = GatewayError(
                "ledger_unavailable", "the payment ledger is unavailable; retry later", retryAfter=2
            ).to_response()
        except Exception:
            log.exception("unexpected failure on request %s", ctx.request_id)
            ctx.reason = "internal_error"
            response = GatewayError(
                "internal_error", "the gateway failed on this request", requestId=ctx.request_id
            ).to_response()
        finally:
            await self.safety.finish(ctx, self.ledger)  # budgets back unless money moved; never raises
            ctx.status = response.status_code if response is not None else None  # None: cancelled
            self._audit(ctx)
        assert response is not None  # every branch above answers, or the exception goes on
        return response

    def resource_url(self, request: Request, ctx: RequestContext) -> str:
        base = self.public_url or str(request.base_url).rstrip("/")
        return f"{base}{ctx.path}?{ctx.query}" if ctx.query else f"{base}{ctx.path}"

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise GatewayError("request_too_large", f"request bodies are limited to {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise GatewayError("request_too_large", f"request bodies are limited to {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _run(self, ctx: RequestContext, request: Request) -> Response:
        # route
        match = route(self.router, ctx.method, ctx.path, request.scope.get("raw_path"))
        tool, ctx.tool, ctx.params = match.tool, match.tool, match.params
        compiled = self.tools[tool.name]
        offer = compiled.offer

        # challenge (size limits, arguments, then the safety checks no price may answer)
        self.safety.check_headers(request.scope["headers"])
        ctx.body = await self._read_body(request)
        ctx.arguments = collect_arguments(tool, ctx.params, request.query_params.multi_items(), ctx.body, ctx.method)
        validate_arguments(compiled.validator, ctx.arguments)
        resource_url = self.resource_url(request, ctx)
        header = request.headers.get(PAYMENT_HEADER)
        header_v1 = request.headers.get(PAYMENT_HEADER_V1) if header is None else None
        version = 1 if header_v1 is not None else (2 if header is not None else self.challenge_body_version)
        binding = request_binding(ctx.method, ctx.path, ctx.query)
        quote = Quote(offer, offer.bound(binding), resource_url, version, binding)
        paying = (header is not None or header_v1 is not None) and ctx.method != "HEAD"
        await self.safety.before_challenge(ctx, tool, int(quote.requirements.amount), paying=paying)
        # Every request, paid or not, spends its client's tokens: a payment header is no pass.
        await self.safety.per_client(ctx, tool)
        if not paying:
            # A HEAD is never paid for: it gets the same offer as GET, and a payment on it is ignored.
            challenge_issued(ctx, quote.requirements)
            raise PaymentChallenge.unpaid(quote, compiled.price_text)

        # verify (decode and bind here; the facilitator's verify runs under the in-flight lock)
        ctx.payment_received = True
        if header is not None:
            payload = decode_payment(header)
            bind(quote, payload)
        else:
            payload = decode_payment_v1(str(header_v1), quote)
        ctx.payload = payload
        try:
            exact = parse_exact_evm(payload)
        except PaymentDecodeError as exc:
            raise GatewayError(exc.code, exc.message) from None
        identifier = payment_identifier(payload)
        # Who signed it, offline and over this offer's own token domain, before anything is keyed
        # on the payer: payer and nonce are public once a payment settles, so a header naming them
        # proves nothing, and a junk signature costs no lookup, lock, rate-limit token or RPC.
        payer = self.signers.signer(quote.requirements, exact)
        if payer is None:
            raise PaymentChallenge(
                quote, "invalid_exact_evm_payload_signature",
                "the signature does not recover to authorization.from for this offer; sign the offer again",
            )
        network = quote.requirements.network
        nonce = exact.authorization.nonce.lower()
        await self.safety.before_verify(ctx, tool, payer)
        keys = [f"pay:{network}:{payer.lower()}:{nonce}"]
        if identifier is not None:
            keys.append(f"pid:{identifier}")
        async with in_flight(self.store, keys, ctx.request_id, self.lock_ttl_ms):
            return await self._paid(ctx, request, quote, payload, exact, payer, nonce, identifier)

    async def _paid(
        self, ctx: RequestContext, request: Request, quote: Quote, payload: PaymentPayload,
        exact: ExactEvmPayload, payer: str, nonce: str, identifier: str | None,
    ) -> Response:
        tool = quote.offer.tool
        requirements = quote.requirements
        fingerprint = request_fingerprint(ctx.method, ctx.path, ctx.query, ctx.body)

        # exactly once: a payment (or payment-identifier) the ledger knows is resumed, not re-run
        known = None
        if identifier is not None:
            known = await self.ledger.run(self.ledger.by_payment_identifier, identifier)
            if known is not None and (
                known.fingerprint != fingerprint or known.payer != payer or known.nonce != nonce
            ):
                raise GatewayError(
                    "payment_identifier_conflict",
                    "this payment-identifier was used for a different request or payment; use a new id",
                    status=409, paymentId=known.id,
                )
        early: asyncio.Future[VerifyResponse] | None = None
        if known is None:
            # The ledger lookup and the facilitator's verify run side by side (a fresh payment, the
            # usual case, needs both); for a payment the ledger knows, verify runs again after resume.
            started = time.perf_counter()
            early = asyncio.ensure_future(verify(self.facilitator, quote, payload))
            try:
                known = await self.ledger.run(
                    self.ledger.by_authorization, requirements.network, requirements.asset, payer, nonce
                )
            except BaseException:
                _discard(early)
                raise
        if (
            known is not None
            and known.state not in (PaymentState.VERIFIED, PaymentState.VOIDED, PaymentState.FAILED)
            and same_payment(known, requirements, exact, tool.name, fingerprint)
        ):
            # A resend of this very signed payload for this very request: resumed, not re-run.
            # Anything else naming a known payment is a fresh payment and verified as one below
            # (a used nonce then gets its 402; one still settling, a 409).
            if early is not None:
                _discard(early)
                early = None
            resumed = await resume(
                known, self.ledger, self.chains.get(known.network),
                write_ahead=known.network in self.write_ahead_networks,
            )
            if resumed is not None:
                ctx.payer, ctx.payment_id = payer, known.id
                if resumed.answer is None:
                    return await self._answer_lost(ctx, quote, resumed.row)
                ctx.outcome = "replayed"
                status, headers, body = resumed.answer
                replay = respond(UpstreamResponse(status, headers, body), receipt_of(resumed.row), ctx.request_id, quote.version)
                replay.headers["X402GW-Replay"] = "true"
                return replay

        if tool.settle == "after":
            try:
                self._check_window(quote, tool, exact)
            except BaseException:
                if early is not None:
                    _discard(early)
                raise
        if early is not None:
            try:
                verified = await early
            finally:
                ctx.timings["verify"] = ctx.timings.get("verify", 0.0) + time.perf_counter() - started
        else:
            with ctx.timed("verify"):
                verified = await verify(self.facilitator, quote, payload)
        ctx.payer = verified.payer
        ctx.record("payment_verified", amount=quote.requirements.amount, network=quote.requirements.network,
                   asset=quote.requirements.asset, payTo=quote.requirements.pay_to, nonce=nonce)
        ctx.outcome = "verified"
        await self.safety.reserve(ctx, tool, ctx.payer or payer, int(requirements.amount))
        row = await self.ledger.run(
            self.ledger.record_verified,
            request_id=ctx.request_id,
            owner=tool.owner,
            tool=tool.name,
            decimals=tool.payment.decimals,
            method=ctx.method,
            path=ctx.path,
            payer=verified.payer or payer,
            pay_to=requirements.pay_to,
            amount=int(requirements.amount),
            network=requirements.network,
            asset=requirements.asset,
            nonce=nonce,
            valid_before=int(payload.payload["authorization"]["validBefore"]),
            authorization=json.dumps(payload.payload, separators=(",", ":")),
            payment_identifier=identifier,
            fingerprint=fingerprint,
            settle_mode=tool.settle,
        )
        ctx.payment_id = row.id
        if row.state != PaymentState.VERIFIED:
            raise GatewayError(
                "payment_already_settled" if row.state == PaymentState.SETTLED else "payment_in_flight",
                f"this payment was already used (state {row.state}); sign a fresh authorization",
                paymentId=row.id,
                transaction=row.tx_hash,
            )
        if tool.settle == "upfront":
            return await self._upfront(ctx, request, quote, payload, row.id)

        # bridge
        upstream = await self._call_upstream(ctx, request, row.id)
        if upstream.status >= 300:
            # The upstream failed, or redirected (not the content, and never followed): nothing is
            # settled, and its answer is passed on as it is.
            await self.ledger.run(
                self.ledger.void, row.id, "upstream_error", upstream_status=upstream.status,
            )
            ctx.outcome = "upstream_error"
            return respond(upstream, None, ctx.request_id, quote.version)

        # settle (the answer is stored with the write-ahead record: a resend of this payment gets it)
        ctx.outcome = "settling"
        try:
            with ctx.timed("settle"):
                receipt = await settle(
                    self.facilitator, self.ledger, row.id, quote, payload, (upstream.status, upstream.headers, upstream.body),
                    hook_writes_ahead=requirements.network in self.write_ahead_networks,
                )
        except PaymentChallenge as refused:
            # The upstream answered but the payment could not settle (balance drained or nonce
            # used mid-call): the answer is withheld, and the unpaid upstream call is on record.
            ctx.record("upstream_answer_withheld", paymentId=row.id, upstreamStatus=upstream.status,
                       reason=refused.code)
            raise
        ctx.settlement = receipt
        ctx.outcome = "settled"
        ctx.record("settled", transaction=receipt.transaction, network=receipt.network, paymentId=ctx.payment_id)

        # respond
        return respond(upstream, receipt, ctx.request_id, quote.version)

    def _check_window(self, quote: Quote, tool: Tool, exact: ExactEvmPayload) -> None:
        """A ``settle: after`` payment must stay valid through the upstream's worst case and the
        settlement after it; otherwise it could expire mid-call and the upstream would have run
        unpaid. The 402 names the minimum."""
        needed = tool.payment_window_seconds
        now = int(time.time())
        remaining = int(exact.authorization.valid_before) - now
        if remaining >= needed or remaining < VALID_BEFORE_MARGIN_SECONDS:
            return  # long enough; or already expired, which verify refuses with its own reason

        raise PaymentChallenge(
            quote, "payment_window_too_short",
            f"{tool.name} needs a payment valid for at least {needed}s (validBefore >= now + {needed}); "
            "sign the offer again with a longer window",
            minimumValidSeconds=needed, validBeforeAtLeast=str(now + needed),
        )

    async def _answer_lost(self, ctx: RequestContext, quote: Quote, row: Payment) -> Response:
        """A settled payment with no stored answer: an ``upfront`` call whose process died between
        the settlement and the stored answer (or whose upstream failed). It is never charged again
        and never run again (the upstream may have acted); a refund is owed, once."""
        receipt = receipt_headers(receipt_of(row), quote.version)
        if row.settle_mode == "upfront" and row.refund_owed is None:
            ctx.payer = ctx.payer or row.payer
            refund = await self._refund(ctx, quote, row.id, "answer_lost")
            raise GatewayError(
                "upstream_answer_lost",
                "this payment was settled but the answer it bought was lost; it will not be charged "
                "again and a refund is owed",
                status=502, headers=receipt, retryable=False, paymentId=row.id, transaction=row.tx_hash, **refund,
            )
        fields: dict[str, Any] = {}
        if row.refund_owed is not None:
            fields = {"refund": "refunded" if row.refunded_at else "owed", "refundAmount": str(row.refund_owed)}
            if row.refund_tx:
                fields["refundTransaction"] = row.refund_tx
        raise GatewayError(
            "payment_already_settled",
            "this payment was settled and its answer is not stored; it will not be charged again",
            status=409, headers=receipt, paymentId=row.id, transaction=row.tx_hash, **fields,
        )

    async def _call_upstream(self, ctx: RequestContext, request: Request, payment_id: int) -> UpstreamResponse:
        tool = ctx.tool
        assert tool is not None
        try:
            with ctx.timed("upstream"):
                upstream = await self.bridge.forward(
                    RecordingUpstream(self.upstream, ctx), tool, ctx.method, ctx.params, ctx.query, ctx.arguments,
                    dict(request.headers), ctx.body, ctx.request_id, self.max_upstream_response_bytes,
                )
        except GatewayError as err:
            await self.safety.upstream_result(ctx, tool, err.code not in ("upstream_timeout", "upstream_unavailable"))
            if tool.settle != "upfront":
                await self.ledger.run(self.ledger.void, payment_id, err.code)
            ctx.outcome = "upstream_failed"
            raise
        ctx.upstream_status = upstream.status
        await self.safety.upstream_result(ctx, tool, upstream.status < 500)
        return upstream

    async def _upfront(
        self, ctx: RequestContext, request: Request, quote: Quote, payload: PaymentPayload, payment_id: int
    ) -> Response:
        """Settle first (the upstream call has side effects and must not run unpaid); if the upstream
        then fails, the payer is owed a refund: recorded always, paid when a refund signer exists."""
        ctx.outcome = "settling"
        with ctx.timed("settle"):
            receipt = await settle(
                self.facilitator, self.ledger, payment_id, quote, payload, None,
                hook_writes_ahead=quote.requirements.network in self.write_ahead_networks,
            )
        ctx.settlement = receipt
        ctx.outcome = "settled"
        ctx.record("settled", transaction=receipt.transaction, network=receipt.network, paymentId=ctx.payment_id)
        try:
            upstream = await self._call_upstream(ctx, request, payment_id)
        except GatewayError as err:
            refund = await self._refund(ctx, quote, payment_id, err.code)
            err.headers.update(receipt_headers(receipt, quote.version))
            err.fields.update(refund)
            raise
        await self.ledger.run(self.ledger.record_upstream_status, payment_id, upstream.status)
        if upstream.status >= 400:
            refund = await self._refund(ctx, quote, payment_id, "upstream_error")
            response = respond(upstream, receipt, ctx.request_id, quote.version)
            response.headers["X402GW-Refund"] = f"{refund['refund']} {refund.get('refundTransaction') or ''}".strip()
            return response
        await self.ledger.run(self.ledger.store_response, payment_id, (upstream.status, upstream.headers, upstream.body))
        return respond(upstream, receipt, ctx.request_id, quote.version)

    async def _refund(self, ctx: RequestContext, quote: Quote, payment_id: int, reason: str) -> dict[str, Any]:
        requirements = quote.requirements
        amount = int(requirements.amount)
        await self.ledger.run(self.ledger.record_refund_owed, payment_id, amount, reason)
        ctx.outcome = "refund_owed"
        if self.refunder is None or not self.refunder.can_refund(requirements.network) or ctx.payer is None:
            return {"refund": "owed", "refundAmount": requirements.amount}

        async def before_send(tx_hash: str) -> None:
            await self.ledger.run(self.ledger.record_refund_tx, payment_id, tx_hash)

        result = await self.refunder.refund(requirements.network, requirements.asset, ctx.payer, amount, before_send)
        if result.confirmed:
            await self.ledger.run(self.ledger.record_refund_paid, payment_id, result.tx_hash)
            ctx.outcome = "refunded"
            return {"refund": "refunded", "refundAmount": requirements.amount, "refundTransaction": result.tx_hash}
        return {"refund": "owed", "refundAmount": requirements.amount, "refundTransaction": result.tx_hash}
    def _audit(self, ctx: RequestContext) -> None:
        try:
            self.audit.submit(audit_events(ctx))
        except Exception:  # the trail logs what it cannot write; a request's answer never depends on it
            log.exception("audit trail submit failed on request %s", ctx.request_id)
        for observer in self.observers:
            try:
                observer.on_outcome(ctx)
            except Exception:  # an observer must never change a request's answer
                log.exception("observer %r failed on request %s", observer, ctx.request_id)
        if not audit_log.isEnabledFor(logging.INFO):
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
        audit_log.info(json.dumps(record, separators=(",", ":")))
