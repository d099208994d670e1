"""Stages ``settle_upfront`` and ``settle``: move the money, exactly once, and only serve when it is final.

``settle_upfront`` settles an ``upfront`` tool's payment before its upstream runs (its call has
side effects and must not run unpaid); ``settle`` settles a ``settle: after`` payment once the
upstream answered, storing that answer with the write-ahead record (a resend gets it), and stores
an ``upfront`` tool's answer for a resend to replay. Writes the
ledger ahead of the chain: ``settling`` before the transaction is broadcast, then ``settled`` with
the tx hash and block, ``failed`` (a definite refusal, nothing moved: a fresh 402), or ``pending``
(outcome unknown: 503 naming the payment and any transaction, never a 402 inviting a second payment).
"""

from __future__ import annotations

from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import Quote
from gateway.protocol.receipts import receipt_headers
from settlement.chain.gas import take_gas
from settlement.errors import ChainUnavailable, FacilitatorUnavailable, LedgerError
from settlement.ledger import Ledger
from settlement.ledger.transitions import KEEP
from settlement.schemes import Schemes
from settlement.schemes.base import Facilitator
from settlement.schemes.channels import accrued
from settlement.schemes.remote import settlement_outcome_unknown
from settlement.schemes.upto import CHARGE_KEY, UPTO, upto_charge
from settlement.x402.wire import PaymentPayload, SettleResponse

__all__ = ["Settle", "SettleUpfront", "settle"]

PENDING_RETRY_AFTER_SECONDS = 5

StoredAnswer = tuple[int, list[tuple[str, str]], bytes]


class SettleUpfront:
    name = "settle_upfront"
    shape_only = False

    def __init__(self, schemes: Schemes, ledger: Ledger) -> None:
        self.schemes = schemes
        self.ledger = ledger

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None and ctx.payment_id is not None
        if tool.settle != "upfront":
            return None
        ctx.outcome = "settling"
        with ctx.timed("settle"):
            receipt = await settle(
                self.schemes, self.ledger, ctx.payment_id, quote, paid.payload, None,
                hook_writes_ahead=self.schemes.writes_ahead(quote.requirements), request_id=ctx.request_id,
            )
        settled(ctx, receipt)
        return None


class Settle:
    name = "settle"
    shape_only = False

    def __init__(self, schemes: Schemes, ledger: Ledger) -> None:
        self.schemes = schemes
        self.ledger = ledger

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None and ctx.payment_id is not None
        upstream = paid.upstream
        assert upstream is not None
        if tool.settle == "upfront":
            # Settled before the upstream ran: the answer (as ``answer`` let it through) is stored
            # for a resend of the payment to replay. One withheld is never stored (a refund is owed).
            await self.ledger.run(self.ledger.store_response, ctx.payment_id, (upstream.status, upstream.headers, upstream.body))
            return None
        ctx.outcome = "settling"
        try:
            with ctx.timed("settle"):
                receipt = await settle(
                    self.schemes, self.ledger, ctx.payment_id, quote, paid.payload,
                    (upstream.status, upstream.headers, upstream.body),
                    hook_writes_ahead=self.schemes.writes_ahead(quote.requirements), request_id=ctx.request_id,
                )
        except PaymentChallenge as refused:
            # The upstream answered but the payment could not settle (balance drained or nonce
            # used mid-call): the answer is withheld, and the unpaid upstream call is on record.
            ctx.record("upstream_answer_withheld", paymentId=ctx.payment_id, upstreamStatus=upstream.status,
                       reason=refused.code)
            raise
        settled(ctx, receipt)
        return None


def _with_charge(result: SettleResponse, quote: Quote) -> SettleResponse:
    """An upto receipt says what was charged of the signed maximum, and how (``extra.charge``)."""
    charge = (quote.requirements.extra or {}).get(CHARGE_KEY)
    if quote.requirements.scheme != UPTO or not isinstance(charge, dict):
        return result
    told = {"maximum": quote.requirements.amount, "capped": False, **charge}
    return result.model_copy(update={"extra": {**(result.extra or {}), CHARGE_KEY: told}})


def settled(ctx: RequestContext, receipt: SettleResponse) -> None:
    """The request's settlement, and its ``settled`` audit record: with the payment row's facts as
    this request holds them (no read), which ``audit verify`` compares with the row
    (``settlement.audit.ledger_check``) and receipts require."""
    ctx.settlement = receipt
    ctx.outcome = "settled"
    facts: dict[str, object] = {}
    tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
    if tool is not None and quote is not None and paid is not None:
        requirements, row = quote.requirements, paid.recorded
        # The row's where this request holds it, else what this request would have written. Besides
        # what a row is about, what a receipt signs: resourceUrl (path), method, argumentsDigest (fingerprint).
        owner, payer, method, path, fingerprint = (
            (row.owner, row.payer, row.method, row.path, row.fingerprint) if row is not None
            else (tool.owner, paid.signer, ctx.method, ctx.path, paid.fingerprint))
        facts = {
            "tool": tool.name, "owner": owner, "payer": payer, "payTo": requirements.pay_to, "asset": requirements.asset,
            "nonce": paid.nonce,
            # What the row holds once settled: an upto payment's charge, not its signed maximum.
            "amount": str(upto_charge(requirements) if requirements.scheme == UPTO else int(requirements.amount)),
            "method": method, "path": path, "fingerprint": fingerprint,
        }
    ctx.record("settled", transaction=receipt.transaction, network=receipt.network, paymentId=ctx.payment_id, **facts)


async def settle(
    facilitator: Facilitator,
    ledger: Ledger,
    payment_id: int,
    quote: Quote,
    payload: PaymentPayload,
    response: StoredAnswer | None = None,
    *,
    hook_writes_ahead: bool = False,
    request_id: str | None = None,
) -> SettleResponse:
    """``hook_writes_ahead``: the facilitator calls ``before_send`` before it broadcasts anything
    (the local and batching ones), so the write-ahead record is made there, in one write.
    ``request_id``: the request that recorded the row; another one that took it over settles it.

    Longer than the usual 60 lines on purpose: the write-ahead record, the one call to the scheme
    and its three outcomes (settled, unknown: 503, refused: 402) read as one sequence, top to bottom."""
    # Write-ahead: `settling`, the answer being bought and (upto) the amount charged are durable
    # before anything is broadcast, and the transaction hash is recorded before it is sent. An upto
    # charge of 0 broadcasts nothing: its record is written here.
    charged = upto_charge(quote.requirements) if quote.requirements.scheme == UPTO else None
    if hook_writes_ahead and charged != 0:

        async def before_send(tx_hash: str) -> None:
            await ledger.run(ledger.begin_settlement, payment_id, response, tx_hash=tx_hash, amount=charged,
                             request_id=request_id)

    else:
        await ledger.run(ledger.begin_settlement, payment_id, response, amount=charged, request_id=request_id)

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
    extra, share = take_gas(result.extra)  # the gas is the ledger's, not the payer's receipt's
    result = result.model_copy(update={"extra": extra})
    gas = share.ledger_fields() if share is not None else None
    block = (result.extra or {}).get("blockNumber")
    if accrued(result):  # batch-settlement: the voucher is accepted; the row stays settling until a claim lands
        return result
    if result.success:
        moved = {"tx_hash": result.transaction} if result.transaction else {}  # an upto charge of 0 moves nothing
        await ledger.run(
            ledger.mark_settled, payment_id, block_number=block if isinstance(block, int) else None, gas=gas, **moved,
        )
        return _with_charge(result, quote)
    if settlement_outcome_unknown(result):
        # Money may have moved: never a 402 inviting a second payment. The row stays open for a
        # reconcile against the chain (by tx hash when the facilitator gave one).
        try:
            await ledger.run(
                ledger.mark_pending, payment_id, tx_hash=result.transaction or KEEP, error_reason=result.error_reason,
            )
        except LedgerError as exc:
            if exc.code != "invalid_transition":
                raise
            # Resolved meanwhile from the chain by another process (a worker's start-up, the
            # background resolver): its write stands; a resend gets what the row says.
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
        tx_hash=result.transaction or None, block_number=block if isinstance(block, int) else None, gas=gas,
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
