"""Stage ``respond``, the last: the upstream's answer, its status and content headers kept, plus the receipt.

Paid content is ``Cache-Control: private, no-store`` so no shared cache serves it for free. With a
receipt key, a settled payment's signed receipt (``X402GW-Receipt``) is derived from its ledger row,
the very row ``GET /receipts/{paymentId}`` derives it from later. Always answers.
"""

from __future__ import annotations

from starlette.responses import Response

from gateway.headers import REQUEST_ID
from gateway.pipeline.context import RequestContext
from gateway.protocol.offers import Quote
from gateway.protocol.receipts import receipt_headers, signed_receipt_header
from gateway.upstream.bridge import DROPPED_RESPONSE_HEADERS, UpstreamResponse
from gateway.upstream.transport import wire_value
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import Ledger, Payment, PaymentState, settled_copy
from settlement.schemes.exact import EXACT
from settlement.schemes.upto import UPTO, upto_charge
from settlement.x402.wire import SettleResponse

__all__ = ["Respond", "respond", "settled_row"]


def respond(upstream: UpstreamResponse, receipt: SettleResponse | None, request_id: str, version: int = 2) -> Response:
    response = Response(content=upstream.body, status_code=upstream.status)
    headers = response.headers
    for name, value in upstream.headers:
        if name.lower() not in DROPPED_RESPONSE_HEADERS and (written := wire_value(value)) is not None:
            headers.append(name, written)
    headers["Cache-Control"] = "private, no-store"
    headers[REQUEST_ID] = request_id
    if receipt is not None:
        for name, value in receipt_headers(receipt, version).items():
            headers[name] = value
    return response


class Respond:
    name = "respond"
    shape_only = False

    def __init__(self, ledger: Ledger | None = None, receipts: ReceiptSigner | None = None,
                 public_url: str | None = None) -> None:
        self.ledger = ledger
        self.receipts = receipts
        self.public_url = public_url

    async def __call__(self, ctx: RequestContext) -> Response | None:
        quote, paid = ctx.quote, ctx.paid
        assert quote is not None and paid is not None and paid.upstream is not None
        response = respond(paid.upstream, ctx.settlement, ctx.request_id, quote.version)
        if self.receipts is not None and self.ledger is not None and ctx.payment_id is not None:
            row = settled_row(paid.recorded, ctx.settlement, quote)
            if row is None:
                row = await self.ledger.run(self.ledger.get, ctx.payment_id)
            if row is not None and row.state == PaymentState.SETTLED and row.tx_hash:
                response.headers.update(signed_receipt_header(self.receipts.receipt(row, self.public_url)))
        return response


def settled_row(recorded: Payment | None, settlement: SettleResponse | None, quote: Quote) -> Payment | None:
    """The ledger row as ``settle`` just wrote it, made from the row ``record`` wrote and what the
    settlement changed (state, transaction, block, and an upto charge), without reading it back: a
    paid answer's receipt is the one ``GET /receipts`` derives from the stored row later (a test
    holds them equal). None where the settlement's writes are not these (other schemes, no
    transaction): the row is read then."""
    requirements = quote.requirements
    if recorded is None or settlement is None or not settlement.success or not settlement.transaction:
        return None
    if requirements.scheme not in (EXACT, UPTO):
        return None
    block = (settlement.extra or {}).get("blockNumber")
    return settled_copy(recorded, tx_hash=settlement.transaction, block_number=block if isinstance(block, int) else None,
                        amount=upto_charge(requirements) if requirements.scheme == UPTO else recorded.amount)
