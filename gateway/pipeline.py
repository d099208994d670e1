"""What happens to a request, in one place.

    request ─▶ route ─▶ challenge ─▶ verify ─▶ bridge ─▶ settle ─▶ respond
                404/405   413/422/402  400/402/409  502/504   402/503
                    audit record written for every outcome, in ``finally``

Each stage lives in ``gateway.stages``; this module only orders them and owns the per-request
context, the in-flight lock on (payer, nonce), and the ledger row's life.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from starlette.requests import Request
from starlette.responses import Response

from catalog import Catalogs, Router, format_amount
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.offers import Offer, Quote, request_binding
from gateway.stages.bridge import UpstreamClient, forward
from gateway.stages.challenge import PaymentChallenge, collect_arguments, validate_arguments
from gateway.stages.respond import respond
from gateway.stages.route import route
from gateway.stages.settle import settle
from gateway.stages.verify import bind, decode_payment, decode_payment_v1, verify
from settlement.codec import parse_exact_evm
from settlement.errors import LedgerError, PaymentDecodeError
from settlement.facilitator import Facilitator
from settlement.ledger import Ledger, PaymentState

audit_log = logging.getLogger("x402gw.audit")
log = logging.getLogger("x402gw.pipeline")

PAYMENT_HEADER = "payment-signature"
PAYMENT_HEADER_V1 = "x-payment"


@dataclass(frozen=True)
class CompiledTool:
    offer: Offer
    validator: Draft202012Validator
    price_text: str


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
    ) -> None:
        self.catalogs = catalogs
        self.router = Router(catalogs.tools)
        self.tools: dict[str, CompiledTool] = {
            tool.name: CompiledTool(
                offer=Offer.for_tool(tool),
                validator=Draft202012Validator(tool.input_schema),
                price_text=format_amount(tool.price_atomic, tool.payment.decimals),
            )
            for tool in catalogs.tools
        }
        self.facilitator = facilitator
        self.ledger = ledger
        self.upstream = upstream
        self.public_url = public_url.rstrip("/") if public_url else None
        self.max_body_bytes = max_body_bytes
        self.max_upstream_response_bytes = max_upstream_response_bytes
        self.challenge_body_version = challenge_body_version
        self._in_flight: set[tuple[str, str, str]] = set()

    async def handle(self, request: Request) -> Response:
        ctx = RequestContext(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            client=request.client.host if request.client else None,
        )
        try:
            response = await self._run(ctx, request)
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
            self._audit(ctx)
        response.headers["X-Request-Id"] = ctx.request_id
        ctx.status = response.status_code
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

        # challenge
        ctx.body = await self._read_body(request)
        ctx.arguments = collect_arguments(tool, ctx.params, request.query_params.multi_items(), ctx.body, ctx.method)
        validate_arguments(compiled.validator, ctx.arguments)
        resource_url = self.resource_url(request, ctx)
        header = request.headers.get(PAYMENT_HEADER)
        header_v1 = request.headers.get(PAYMENT_HEADER_V1) if header is None else None
        version = 1 if header_v1 is not None else (2 if header is not None else self.challenge_body_version)
        quote = Quote(offer, offer.bound(request_binding(ctx.method, ctx.path, ctx.query)), resource_url, version)
        if (header is None and header_v1 is None) or ctx.method == "HEAD":
            # A HEAD is never paid for: it gets the same offer as GET, and a payment on it is ignored.
            ctx.outcome = "challenged"
            raise PaymentChallenge(
                quote,
                "payment_required",
                f"{tool.name} costs {compiled.price_text} per call; sign the offer in PAYMENT-REQUIRED "
                "and send it as PAYMENT-SIGNATURE",
            )

        # verify
        if header is not None:
            payload = decode_payment(header)
            bind(quote, payload)
        else:
            payload = decode_payment_v1(str(header_v1), quote)
        ctx.payload = payload
        try:
            authorization = parse_exact_evm(payload).authorization
        except PaymentDecodeError as exc:
            raise GatewayError(exc.code, exc.message) from None
        lock_key = (quote.requirements.network, authorization.from_.lower(), authorization.nonce.lower())
        if lock_key in self._in_flight:
            raise GatewayError(
                "payment_in_flight", "this payment is already being processed; wait for that request's answer"
            )
        self._in_flight.add(lock_key)
        try:
            return await self._paid(ctx, request, quote, payload, authorization.nonce)
        finally:
            self._in_flight.discard(lock_key)

    async def _paid(
        self, ctx: RequestContext, request: Request, quote: Quote, payload: Any, nonce: str
    ) -> Response:
        tool = quote.offer.tool
        requirements = quote.requirements
        verified = await verify(self.facilitator, quote, payload)
        ctx.payer = verified.payer
        ctx.outcome = "verified"
        row = await asyncio.to_thread(
            self.ledger.record_verified,
            request_id=ctx.request_id,
            owner=tool.owner,
            tool=tool.name,
            method=ctx.method,
            path=ctx.path,
            payer=verified.payer,
            pay_to=requirements.pay_to,
            amount=int(requirements.amount),
            network=requirements.network,
            asset=requirements.asset,
            nonce=nonce.lower(),
            valid_before=int(payload.payload["authorization"]["validBefore"]),
            authorization=json.dumps(payload.payload, separators=(",", ":")),
        )
        ctx.payment_id = row.id
        if row.state != PaymentState.VERIFIED:
            raise GatewayError(
                "payment_already_settled" if row.state == PaymentState.SETTLED else "payment_in_flight",
                f"this payment was already used (state {row.state}); sign a fresh authorization",
                paymentId=row.id,
                transaction=row.tx_hash,
            )

        # bridge
        try:
            upstream = await forward(
                self.upstream, tool, ctx.method, ctx.params, ctx.query, dict(request.headers), ctx.body,
                ctx.request_id, self.max_upstream_response_bytes,
            )
        except GatewayError as err:
            await asyncio.to_thread(self.ledger.update, row.id, state=PaymentState.VOIDED, error_reason=err.code)
            ctx.outcome = "upstream_failed"
            raise
        ctx.upstream_status = upstream.status
        if upstream.status >= 400:
            # The upstream failed: nothing is settled, and its error is passed on as it is.
            await asyncio.to_thread(
                self.ledger.update, row.id, state=PaymentState.VOIDED, upstream_status=upstream.status,
                error_reason="upstream_error",
            )
            ctx.outcome = "upstream_error"
            return respond(upstream, None, ctx.request_id, quote.version)

        # settle
        ctx.outcome = "settling"
        receipt = await settle(self.facilitator, self.ledger, row.id, quote, payload)
        ctx.settlement = receipt
        ctx.outcome = "settled"
        await asyncio.to_thread(self.ledger.update, row.id, upstream_status=upstream.status)

        # respond
        return respond(upstream, receipt, ctx.request_id, quote.version)

    def _audit(self, ctx: RequestContext) -> None:
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
