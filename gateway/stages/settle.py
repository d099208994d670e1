"""Stage 6, settle: move the money, exactly once, and only serve when it is final.

Writes the ledger ahead of the chain: ``settling`` before the transaction is broadcast, then
``settled`` with the tx hash and block, ``failed`` (nothing moved: a fresh 402), or ``pending``
(outcome not final: 503 naming the transaction, never a plain 402 inviting a second payment).
"""

from __future__ import annotations

import asyncio

from gateway.errors import GatewayError
from gateway.offers import Offer
from gateway.stages.challenge import PaymentChallenge
from settlement.codec import encode_header
from settlement.errors import ChainUnavailable, FacilitatorUnavailable
from settlement.facilitator import Facilitator
from settlement.ledger import Ledger, PaymentState
from settlement.wire import PaymentPayload, SettleResponse

PENDING_RETRY_AFTER_SECONDS = 5


async def settle(
    facilitator: Facilitator,
    ledger: Ledger,
    payment_id: int,
    offer: Offer,
    payload: PaymentPayload,
    resource_url: str,
) -> SettleResponse:
    await asyncio.to_thread(ledger.update, payment_id, state=PaymentState.SETTLING)
    try:
        result = await facilitator.settle(payload, offer.requirements)
    except (ChainUnavailable, FacilitatorUnavailable) as exc:
        # Raised before anything was broadcast (the facilitator reports broadcasts as pending).
        await asyncio.to_thread(
            ledger.update, payment_id, state=PaymentState.FAILED, error_reason="settlement_unavailable"
        )
        raise GatewayError(
            "settlement_unavailable",
            "settlement is unavailable; nothing was charged; retry the same payment later",
            retryAfter=2,
            paymentId=payment_id,
        ) from exc
    block = (result.extra or {}).get("blockNumber")
    if result.success:
        await asyncio.to_thread(
            ledger.update,
            payment_id,
            state=PaymentState.SETTLED,
            tx_hash=result.transaction,
            block_number=block if isinstance(block, int) else None,
        )
        return result
    if result.error_reason == "settlement_pending" or (result.transaction and block is None):
        await asyncio.to_thread(
            ledger.update, payment_id, state=PaymentState.PENDING, tx_hash=result.transaction or None,
            error_reason=result.error_reason,
        )
        raise GatewayError(
            "settlement_pending",
            "the payment was broadcast but is not final; the content is held; resend the same payment later",
            headers={"PAYMENT-RESPONSE": encode_header(result)},
            retryAfter=PENDING_RETRY_AFTER_SECONDS,
            paymentId=payment_id,
            transaction=result.transaction or None,
        )
    await asyncio.to_thread(
        ledger.update, payment_id, state=PaymentState.FAILED, error_reason=result.error_reason,
        tx_hash=result.transaction or None, block_number=block if isinstance(block, int) else None,
    )
    challenge = PaymentChallenge(
        offer,
        resource_url,
        result.error_reason or "settlement_failed",
        "settlement failed and nothing was charged; pay again with a fresh authorization",
        paymentId=payment_id,
        transaction=result.transaction or None,
    )
    challenge.headers["PAYMENT-RESPONSE"] = encode_header(result)
    raise challenge
