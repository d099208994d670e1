"""The receipt of a settled (or refused) payment, in the header the client's protocol version reads."""

from __future__ import annotations

from gateway.headers import PAYMENT_RESPONSE, X_PAYMENT_RESPONSE
from settlement.chain.networks import to_legacy
from settlement.x402.codec import encode_header
from settlement.x402.wire import SettlementResponseV1, SettleResponse

__all__ = ["receipt_headers"]


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
        return {X_PAYMENT_RESPONSE: encode_header(v1)}
    return {PAYMENT_RESPONSE: encode_header(result)}
