"""The x402 HTTP protocol as the gateway speaks it: offers and their 402, reading a payment off a
request, receipts. Imports no other room of the gateway but its vocabulary (errors, headers)."""

from gateway.protocol.bazaar import BAZAAR, bazaar_extension
from gateway.protocol.challenge import PAYMENT_REQUIRED_CODE, PaymentChallenge
from gateway.protocol.offers import (
    PAYMENT_IDENTIFIER,
    Offer,
    Quote,
    mismatch,
    payment_required,
    request_binding,
)
from gateway.protocol.payment import (
    bind,
    decode_payment,
    decode_payment_v1,
    payment_identifier,
)
from gateway.protocol.receipts import receipt_headers

__all__ = [
    "BAZAAR",
    "PAYMENT_IDENTIFIER",
    "PAYMENT_REQUIRED_CODE",
    "Offer",
    "PaymentChallenge",
    "Quote",
    "bazaar_extension",
    "bind",
    "decode_payment",
    "decode_payment_v1",
    "mismatch",
    "payment_identifier",
    "payment_required",
    "receipt_headers",
    "request_binding",
]
