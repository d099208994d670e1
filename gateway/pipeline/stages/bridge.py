"""Stage ``bridge``: the one stage that talks to the upstream, then says what its answer means.

Writes ``ctx.upstream_status`` and ``Paid.upstream``, and tells the circuit breaker how the
upstream did. For a ``settle: after`` payment, an upstream that failed or redirected (status >= 300;
never followed) voids the payment and its answer is passed on unpaid. For an ``upfront`` one
(already settled), a failure is recorded as a refund owed (and paid where a refund signer exists), unless it is
the caller's request that failed (``refunds.callers_failure``; the tool's ``refund_on``). An upstream
that answers 429 to the owner's credentials opens the breaker for its Retry-After (``Breakers.back_off``):
its tools are refused before any 402 meanwhile, not paid for and refunded;
a good answer goes on to ``answer`` and ``settle`` (which stores it for a resend to replay). Every attempt is noted for the
audit trail through ``RecordingUpstream``.
"""

from __future__ import annotations

import logging

from starlette.responses import Response

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import RETRY_AFTER, X402GW_REFUND, lower
from gateway.pipeline.context import RequestContext
from gateway.pipeline.refunds import Refunds, keeps_charge, user_scoped
from gateway.pipeline.stages.audit import RecordingUpstream
from gateway.pipeline.stages.respond import respond
from gateway.protocol.offers import Quote
from gateway.protocol.receipts import receipt_headers
from gateway.safety.checks import Safety
from gateway.upstream.bridge import Bridge, UpstreamClient, UpstreamResponse, retry_after_seconds
from gateway.upstream.failures import UpstreamFailure
from gateway.upstream.user_auth import UserAuthority
from settlement.ledger import Ledger

__all__ = ["CallUpstream"]

log = logging.getLogger("x402gw.pipeline")

_UNREACHABLE = ("upstream_timeout", "upstream_unavailable")  # what counts against the breaker


class CallUpstream:
    name = "bridge"
    shape_only = False

    def __init__(
        self, bridge: Bridge, upstream: UpstreamClient, *, safety: Safety, ledger: Ledger, refunds: Refunds,
        max_response_bytes: int, users: UserAuthority | None = None,
    ) -> None:
        self.bridge = bridge
        self.upstream = upstream
        self.safety = safety
        self.ledger = ledger
        self.refunds = refunds
        self.max_response_bytes = max_response_bytes
        self.users = users  # a user-scoped tool's token (or its exchange) goes upstream

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid, payment_id = ctx.tool, ctx.quote, ctx.paid, ctx.payment_id
        assert tool is not None and quote is not None and paid is not None and payment_id is not None
        try:
            upstream = await self._forward(ctx, payment_id)
        except GatewayError as err:
            if tool.settle == "upfront":
                await self._upfront_failed(ctx, quote, payment_id, err)
            raise
        except Exception as exc:  # a fault of ours past an upfront settlement: never charged without its answer
            if tool.settle != "upfront":  # nothing settled: the payment is let go (voided), never left open
                log.exception("upstream call of payment %d failed unexpectedly; the payment is voided", payment_id)
                await self.ledger.run(self.ledger.void, payment_id, codes.INTERNAL_ERROR)
                ctx.outcome = "upstream_failed"
                raise
            log.exception("upstream call of settled payment %d failed unexpectedly; a refund is owed", payment_id)
            failed = GatewayError(codes.INTERNAL_ERROR, "the gateway failed to get the upstream's answer; the payment "
                                  "settled before the call is owed back (X402GW-Refund)", status=500, retryable=True)
            await self._upfront_failed(ctx, quote, payment_id, failed)
            raise failed from exc
        paid.upstream = upstream
        if tool.settle == "upfront":
            return await self._settled_outcome(ctx, quote, upstream, payment_id)
        if upstream.status >= 300:
            # The upstream failed, or redirected (not the content, and never followed): nothing is
            # settled, and its answer is passed on as it is.
            await self.ledger.run(self.ledger.void, payment_id, "upstream_error", upstream_status=upstream.status)
            ctx.outcome = "upstream_error"
            return respond(upstream, None, ctx.request_id, quote.version)
        return None

    async def _forward(self, ctx: RequestContext, payment_id: int) -> UpstreamResponse:
        tool, request = ctx.tool, ctx.request
        assert tool is not None and request is not None
        try:
            # The end user's credential (their token, its exchange, or the verified payer's account).
            user = await self.users.for_call(tool, ctx.user, ctx.payer) if self.users is not None else None
            with ctx.timed("upstream"):
                upstream = await self.bridge.forward(
                    RecordingUpstream(self.upstream, ctx), tool, ctx.method, ctx.params,
                    ctx.query if ctx.answer_request is None else ctx.answer_request.upstream_query, ctx.arguments,
                    dict(request.headers), ctx.body, ctx.request_id, self.max_response_bytes, user, tool.stream,
                )
        except GatewayError as err:
            await self.safety.upstream_result(ctx, tool, err.code not in _UNREACHABLE)
            if tool.settle != "upfront":
                await self.ledger.run(self.ledger.void, payment_id, err.code)
            ctx.outcome = "upstream_failed"
            raise
        ctx.upstream_status = upstream.status
        await self.safety.upstream_result(ctx, tool, upstream.status < 500)
        if upstream.status == 429 and not user_scoped(tool):  # the owner's quota: nobody is served now
            await self.safety.breakers.back_off(tool, retry_after_seconds(upstream.header(lower(RETRY_AFTER))))
        return upstream

    async def _upfront_failed(self, ctx: RequestContext, quote: Quote, payment_id: int, err: GatewayError) -> None:
        """An ``upfront`` call (settled) that got no usable answer: a refund is owed, unless it is the
        caller's request that failed (a failure rule's 4xx, a SOAP Client fault; ``callers_failure``):
        then it stays charged and its answer is stored, for a resend of the payment to get again."""
        assert ctx.settlement is not None and ctx.tool is not None
        err.headers.update(receipt_headers(ctx.settlement, quote.version))
        status = err.fields.get("upstreamStatus")
        if (isinstance(err, UpstreamFailure) and keeps_charge(ctx.tool, err.status, err.fields.get("faultCode"))
                and await self.ledger.run(self.ledger.record_upstream_status, payment_id,
                                          status if isinstance(status, int) else err.status)):
            # claimed as its answer first (else the refund of an answer lost is owed already: below, not twice)
            err.fields["refund"] = "none"
            answer = (err.status, [("content-type", "application/json")], bytes(err.to_response().body))
            await self.ledger.run(self.ledger.store_response, payment_id, answer)
            return
        err.fields.update(await self.refunds.owe(ctx, quote, payment_id, err.code))

    async def _settled_outcome(
        self, ctx: RequestContext, quote: Quote, upstream: UpstreamResponse, payment_id: int
    ) -> Response | None:
        """An ``upfront`` payment settled before the call: a failed call is owed a refund; a good
        answer goes on (``answer`` checks it, ``settle`` stores it for a resend to replay)."""
        ledger = self.ledger
        if not await ledger.run(ledger.record_upstream_status, payment_id, upstream.status):
            # The refund of an answer lost is owed already (the sweep took this request for dead: its
            # lock lost, Redis restarted): never the answer too.
            assert ctx.settlement is not None
            raise GatewayError(codes.UPSTREAM_ANSWER_LOST, "this payment's refund is owed already (the gateway took "
                               "its answer for lost); the answer is not given", status=502, retryable=False,
                               headers=receipt_headers(ctx.settlement, quote.version), paymentId=payment_id, refund="owed")
        if upstream.status >= 400:
            response = respond(upstream, ctx.settlement, ctx.request_id, quote.version)
            assert ctx.tool is not None
            if keeps_charge(ctx.tool, upstream.status):
                # The caller's request failed: charged, and stored, so a resend of this payment gets this answer
                # again (not a refund for an answer lost: that would give the gas drain back).
                await ledger.run(ledger.store_response, payment_id, (upstream.status, upstream.headers, upstream.body))
                response.headers[X402GW_REFUND] = "none"
                return response
            refund = await self.refunds.owe(ctx, quote, payment_id, "upstream_error")
            response.headers[X402GW_REFUND] = f"{refund['refund']} {refund.get('refundTransaction') or ''}".strip()
            return response
        return None
