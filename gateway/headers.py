"""Every HTTP header name the gateway reads or writes, in one place (the vocabulary; imports nothing).

Names are written in their canonical case; ``*_LOWER`` forms are for ASGI scopes and
``request.headers`` look-ups, which are lower case.
"""

from __future__ import annotations

__all__ = [
    "ACCEPT",
    "ACCEPT_LANGUAGE",
    "AUTHORIZATION",
    "CACHE_CONTROL",
    "CONTENT_TYPE",
    "PAYMENT_HEADERS",
    "PAYMENT_REQUIRED",
    "PAYMENT_RESPONSE",
    "PAYMENT_SIGNATURE",
    "REQUEST_ID",
    "RETRY_AFTER",
    "SIGN_IN_WITH_X",
    "SOAP_ACTION",
    "USER_AGENT",
    "WWW_AUTHENTICATE",
    "X402GW_PREFIX",
    "X402GW_REACCESS",
    "X402GW_RECEIPT",
    "X402GW_RECEIPT_SIGNATURE",
    "X402GW_RECEIPT_TIME",
    "X402GW_REFUND",
    "X402GW_REPLAY",
    "X402GW_TRIMMED",
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
# x402 sign-in-with-x: a payer's signed EIP-4361 message, to get again what it paid for (re-access)
SIGN_IN_WITH_X = "SIGN-IN-WITH-X"
# the gateway's own
REQUEST_ID = "X-Request-Id"
X402GW_PREFIX = "X402GW-"
X402GW_REPLAY = "X402GW-Replay"
X402GW_REFUND = "X402GW-Refund"
# On an answer served by re-access (no charge): the ledger id of the payment that bought it.
X402GW_REACCESS = "X402GW-Reaccess"
# What the gateway cut from an answer at the caller's asking (x402gw_* query parameters).
X402GW_TRIMMED = "X402GW-Trimmed"
# The signed receipt of a settled payment (base64 JSON), and a payer's proof when fetching one later.
X402GW_RECEIPT = "X402GW-Receipt"
X402GW_RECEIPT_TIME = "X402GW-Receipt-Time"
X402GW_RECEIPT_SIGNATURE = "X402GW-Receipt-Signature"
# Every x402 payment header of either version: the gateway's alone, never passed to or from an upstream.
PAYMENT_HEADERS = (PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PAYMENT_RESPONSE, X_PAYMENT, X_PAYMENT_REQUIRED, X_PAYMENT_RESPONSE)
# HTTP's own, where the gateway reads or sets them by name
ACCEPT = "Accept"
ACCEPT_LANGUAGE = "Accept-Language"
AUTHORIZATION = "Authorization"
CACHE_CONTROL = "Cache-Control"
CONTENT_TYPE = "Content-Type"
RETRY_AFTER = "Retry-After"
SOAP_ACTION = "SOAPAction"
USER_AGENT = "User-Agent"
WWW_AUTHENTICATE = "WWW-Authenticate"


def lower(name: str) -> str:
    """The lower-case form used by ASGI scopes and Starlette's header look-ups."""
    return name.lower()
