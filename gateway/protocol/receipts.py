"""The receipt of a settled (or refused) payment, in the header the client's protocol version reads."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from gateway.headers import PAYMENT_RESPONSE, X402GW_RECEIPT, X_PAYMENT_RESPONSE
from settlement.chain.networks import to_legacy
from settlement.x402.codec import encode_header
from settlement.x402.wire import SettlementResponseV1, SettleResponse

__all__ = ["decode_signed_receipt", "receipt_headers", "signed_receipt_header"]


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


def signed_receipt_header(receipt: Mapping[str, Any]) -> dict[str, str]:
    """``X402GW-Receipt``: the gateway-signed receipt (``settlement.finance.receipts``), base64 of
    its compact JSON, beside ``PAYMENT-RESPONSE`` (which SDK clients parse strictly, so it is left
    as the protocol defines it)."""
    data = json.dumps(receipt, separators=(",", ":"), sort_keys=True).encode()
    return {X402GW_RECEIPT: base64.b64encode(data).decode("ascii")}


def decode_signed_receipt(value: str) -> Any:
    return json.loads(base64.b64decode(value, validate=True))
