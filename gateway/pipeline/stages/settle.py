"""Stage 6, settle: move the money, exactly once, and only serve when it is final.

Writes the ledger ahead of the chain: ``settling`` before the transaction is broadcast, then
``settled`` with the tx hash and block, ``failed`` (a definite refusal, nothing moved: a fresh 402),
or ``pending`` (outcome unknown: pending, timed out or a broken facilitator answer; 503 naming the
payment and any transaction, never a plain 402 inviting a second payment).
"""

from __future__ import annotations


from gateway.errors import GatewayError
from gateway.protocol.offers import Quote
from gateway.pipeline.stages.challenge import PaymentChallenge
from settlement.x402.codec import encode_header
from settlement.errors import ChainUnavailable, FacilitatorUnavailable
from settlement.schemes.facilitator import Facilitator
from settlement.ledger.payments import Ledger
from settlement.schemes.remote import settlement_outcome_unknown
from settlement.chain.networks import to_legacy
from settlement.x402.wire import PaymentPayload, SettlementResponseV1, SettleResponse

PENDING_RETRY_AFTER_SECONDS = 5

StoredAnswer = tuple[int, list[tuple[str, str]], bytes]


def receipt_headers(result: SettleResponse, version: int) -> dict[str, str]:
    """``PAYMENT-RESPONSE`` for v2 clients; ``X-PAYMENT-RESPONSE`` in the v1 shape for v1 clients."""
    if version == 1:
        v1 = SettlementResponseV1(
            success=result.success,
            error_reason=result.error_reason,
            transaction=result.transaction,
            network=to_legacy(result.network),
            payer=result.payer or "",
        )
        return {"X-PAYMENT-RESPONSE": encode_header(v1)}
    return {"PAYMENT-RESPONSE": encode_header(result)}


async def settle(
    facilitator: Facilitator,
    ledger: Ledger,
    payment_id: int,
    quote: Quote,
    payload: PaymentPayload,
    response: StoredAnswer | None = None,
    *,
    hook_writes_ahead: bool = False,
) -> SettleResponse:
    """``hook_writes_ahead``: the facilitator calls ``before_send`` before it broadcasts anything
    (the local and batching ones), so the write-ahead record is made there, in one write."""
    # Write-ahead: `settling` and the answer being bought are durable before anything is broadcast,
    # and the transaction hash is recorded before it is sent.
    if hook_writes_ahead:

        async def before_send(tx_hash: str) -> None:
            await ledger.run(ledger.begin_settlement, payment_id, response, tx_hash=tx_hash)

    else:
        await ledger.run(ledger.begin_settlement, payment_id, response)

        async def before_send(tx_hash: str) -> None:
            await ledger.run(ledger.record_tx_hash, payment_id, tx_hash)

    try:
        result = await facilitator.settle(payload, quote.requirements, before_send=before_send)
    except (ChainUnavailable, FacilitatorUnavailable) as exc:
        # Raised before anything was broadcast (the facilitator reports broadcasts as pending).
        await ledger.run(ledger.fail, payment_id, "settlement_unavailable")
        raise GatewayError(
            "settlement_unavailable",
            "settlement is unavailable; nothing was charged; retry the same payment later",
            retryAfter=2,
            paymentId=payment_id,
        ) from exc
    block = (result.extra or {}).get("blockNumber")
    if result.success:
        await ledger.run(
            ledger.mark_settled,
            payment_id,
            tx_hash=result.transaction,
            block_number=block if isinstance(block, int) else None,
        )
        return result
    if settlement_outcome_unknown(result):
        # Money may have moved: never a 402 inviting a second payment. The row stays open for a
        # reconcile against the chain (by tx hash when the facilitator gave one).
        await ledger.run(
            ledger.mark_pending, payment_id, tx_hash=result.transaction or None, error_reason=result.error_reason,
        )
        if result.transaction:
            code = "settlement_pending"
            message = "the payment was broadcast but is not final; the content is held; resend the same payment later"
        else:
            code = "settlement_unknown"
            message = "the outcome of the settlement is not known yet; the content is held; resend the same payment later"
        fields = {"transaction": result.transaction} if result.transaction else {}
        raise GatewayError(
            code,
            message,
            status=503,
            headers=receipt_headers(result, quote.version),
            retryAfter=PENDING_RETRY_AFTER_SECONDS,
            paymentId=payment_id,
            reason=result.error_reason,
            **fields,
        )
    await ledger.run(
        ledger.fail, payment_id, result.error_reason,
        tx_hash=result.transaction or None, block_number=block if isinstance(block, int) else None,
    )
    challenge = PaymentChallenge(
        quote,
        result.error_reason or "settlement_failed",
        "settlement failed and nothing was charged; pay again with a fresh authorization",
        paymentId=payment_id,
        transaction=result.transaction or None,
    )
    challenge.headers.update(receipt_headers(result, quote.version))
    raise challenge
