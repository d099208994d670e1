"""Stages ``payment_window``, ``verify`` and ``record``: a fresh payment checked, confirmed, written down.

``payment_window`` refuses with 402 a payment that could expire, by the chain's clock, before its
settlement is mined (a ``settle: after`` tool's: while the upstream works too). ``verify`` has the
payment's scheme verify it (started early, beside the ledger lookup, by ``exactly_once``); a
rejection is a 402 carrying a fresh offer and the scheme's reason code, passed through unchanged.
``record`` writes the ``verified`` ledger row (``ctx.payment_id``); a row that is already further on
is a 409.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import Quote
from settlement.chain.head_clock import HeadClock
from settlement.errors import ChainUnavailable, FacilitatorUnavailable
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schemes import VALID_BEFORE_MARGIN_SECONDS
from settlement.schemes.base import Facilitator
from settlement.schemes.upto import UPTO, upto_charge
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, VerifyResponse

__all__ = ["PaymentWindow", "Record", "Verify", "verify"]


async def verify(facilitator: Facilitator, quote: Quote, payload: PaymentPayload) -> VerifyResponse:
    """The one place the chain asks a scheme to verify a payment."""
    try:
        result = await facilitator.verify(payload, quote.requirements)
    except (ChainUnavailable, FacilitatorUnavailable) as exc:
        raise GatewayError(
            "facilitator_unavailable", "payment verification is unavailable; retry later", retryAfter=2
        ) from exc
    if not result.is_valid:
        reason = result.invalid_reason or "invalid_payment"
        raise PaymentChallenge(quote, reason, result.invalid_message or "the payment was refused")
    return result


class PaymentWindow:
    """A payment must stay valid until its settlement is mined: for a ``settle: after`` tool, through
    the upstream's worst case and the settlement after it (else it could expire mid-call, the
    upstream run unpaid); for an ``upfront`` one, through its settlement (else it is broadcast to
    revert on the gateway's gas). Both keep the settle margin (``Tool.payment_window_seconds``):
    verify, the write-ahead and the block after the broadcast (a 12 s slot and its propagation).
    Judged by the chain's clock where it is ahead of ours (``HeadClock``): the token judges
    ``validBefore`` by the block's timestamp. The 402 names the minimum. Only fresh payments get
    here (a resend was resumed)."""

    name = "payment_window"
    shape_only = False

    def __init__(self, clocks: Mapping[str, HeadClock] | None = None) -> None:
        self.clocks = dict(clocks or {})  # by network; none known: our clock alone

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None
        clock = self.clocks.get(quote.requirements.network)
        ahead = 0 if clock is None else await clock.read_ahead()
        check_window(quote, tool.name, tool.payment_window_seconds, paid.exact, ahead)
        return None


def check_window(quote: Quote, tool: str, needed: int, exact: ExactEvmPayload, ahead: int = 0) -> None:
    """Refuses (402 ``payment_window_too_short``) a payment with less than ``needed`` seconds left by
    the chain's clock (ours plus ``ahead``); one expired by our clock too is left to verify's reason."""
    now = int(time.time())
    valid_before = int(exact.authorization.valid_before)
    if valid_before - (now + ahead) >= needed or valid_before < now + VALID_BEFORE_MARGIN_SECONDS:
        return  # long enough; or already expired, which verify refuses with its own reason
    by_chain = f" by the chain's clock, {ahead}s ahead of ours" if ahead else ""
    raise PaymentChallenge(
        quote, "payment_window_too_short",
        f"{tool} needs a payment valid for at least {needed}s{by_chain} (validBefore >= {now + ahead + needed}); "
        "sign the offer again with a longer window",
        minimumValidSeconds=needed, validBeforeAtLeast=str(now + ahead + needed),
    )


class Verify:
    name = "verify"
    shape_only = False

    def __init__(self, facilitator: Facilitator) -> None:
        self.facilitator = facilitator

    async def __call__(self, ctx: RequestContext) -> Response | None:
        quote, paid = ctx.quote, ctx.paid
        assert quote is not None and paid is not None
        early = paid.early_verify
        if early is not None:
            paid.early_verify = None  # awaited here: no longer the finalizers' to cancel
            try:
                verified = await early
            finally:
                ctx.timings["verify"] = ctx.timings.get("verify", 0.0) + time.perf_counter() - paid.early_started
        else:
            with ctx.timed("verify"):
                verified = await verify(self.facilitator, quote, paid.payload)
        if verified.payer and verified.payer.lower() != paid.signer.lower():
            # The facilitator names another payer than the one whose signature this is: its answer is
            # not about this payment (refunds, budgets and the ledger follow the signer, never it).
            raise GatewayError("facilitator_unavailable", "the facilitator's verification named another payer than "
                               "the payment's signer; nothing was charged; retry later", retryAfter=2)
        paid.verified = verified
        ctx.payer = paid.signer  # recovered offline (decode): the facilitator's spelling is not the ledger's key
        requirements = quote.requirements
        ctx.record("payment_verified", amount=requirements.amount, network=requirements.network,
                   asset=requirements.asset, payTo=requirements.pay_to, nonce=paid.nonce)
        ctx.outcome = "verified"
        return None


class Record:
    name = "record"
    shape_only = False

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None and paid.verified is not None
        requirements = quote.requirements
        fields = dict(
            request_id=ctx.request_id,
            owner=tool.owner,
            tool=tool.name,
            decimals=tool.payment.decimals,
            method=ctx.method,
            path=ctx.path,
            payer=paid.signer,
            pay_to=requirements.pay_to,
            amount=upto_charge(requirements) if requirements.scheme == UPTO else int(requirements.amount),
            network=requirements.network,
            asset=requirements.asset,
            nonce=paid.nonce,
            valid_before=int(paid.exact.authorization.valid_before),
            authorization=json.dumps(paid.payload.payload, separators=(",", ":")),
            payment_identifier=paid.identifier,
            fingerprint=paid.fingerprint,
            settle_mode=tool.settle,
        )
        row = await self.ledger.run(self.ledger.record_verified, **fields)
        if row.state == PaymentState.VERIFIED and row.request_id != ctx.request_id:
            # Left by a request that died after recording it (we hold the payment's lock now): this
            # request takes it over, so the row names what is bought and only this request settles it.
            taken = await self.ledger.run(self.ledger.take_over, row.id, row.request_id, fields)
            now_row: Payment | None = await self.ledger.run(self.ledger.get, row.id)
            row = now_row or row
            if not taken and row.state == PaymentState.VERIFIED:  # taken by yet another request meanwhile
                raise GatewayError("payment_in_flight", "this payment is being processed by another request",
                                   paymentId=row.id)
        ctx.payment_id = row.id
        paid.recorded = row
        if row.state != PaymentState.VERIFIED:
            raise GatewayError(
                "payment_already_settled" if row.state == PaymentState.SETTLED else "payment_in_flight",
                f"this payment was already used (state {row.state}); sign a fresh authorization",
                paymentId=row.id,
                transaction=row.tx_hash,
            )
        return None
