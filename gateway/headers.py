"""Every HTTP header name the gateway reads or writes, in one place (the vocabulary; imports nothing).

Names are written in their canonical case; ``*_LOWER`` forms are for ASGI scopes and
``request.headers`` look-ups, which are lower case.
"""

from __future__ import annotations

__all__ = [
    "PAYMENT_REQUIRED",
    "PAYMENT_RESPONSE",
    "PAYMENT_SIGNATURE",
    "REQUEST_ID",
    "X402GW_PREFIX",
    "X402GW_REFUND",
    "X402GW_REPLAY",
    "X_PAYMENT",
    "X_PAYMENT_REQUIRED",
    "X_PAYMENT_RESPONSE",
    "lower",
]

# x402 v2 (the offer, the payment, the receipt)
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
# x402 v1 (the payment and the receipt; v1 offers travel in the body)
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_REQUIRED = "X-PAYMENT-REQUIRED"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
# the gateway's own
REQUEST_ID = "X-Request-Id"
X402GW_PREFIX = "X402GW-"
X402GW_REPLAY = "X402GW-Replay"
X402GW_REFUND = "X402GW-Refund"


def lower(name: str) -> str:
    """The lower-case form used by ASGI scopes and Starlette's header look-ups."""
    return name.lower()
