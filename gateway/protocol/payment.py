"""Reading a payment off a request: decode the header (v2 ``PAYMENT-SIGNATURE`` or v1 ``X-PAYMENT``),
bind it to this request's offer, and read the client's ``payment-identifier``.

A header that cannot be a payment is a 400 with a decode code; a payment for another offer (route,
method, price, payTo, asset, network) is a 402 carrying a fresh offer and the field that differs.
"""

from __future__ import annotations

import re

from gateway.errors import GatewayError
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import PAYMENT_IDENTIFIER, Quote, mismatch
from settlement.chain.networks import to_caip2
from settlement.errors import PaymentDecodeError
from settlement.x402.codec import decode_payment_header, decode_payment_header_v1
from settlement.x402.wire import X402_VERSION, PaymentPayload

__all__ = ["bind", "decode_payment", "decode_payment_v1", "payment_identifier"]

_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{16,128}")


def decode_payment(header: str) -> PaymentPayload:
    try:
        payload = decode_payment_header(header)
    except PaymentDecodeError as exc:
        raise GatewayError(exc.code, exc.message, status=400) from None
    if payload.x402_version != X402_VERSION:
        raise GatewayError("invalid_x402_version", f"x402Version {payload.x402_version} is not supported here; use 2")
    return payload


def decode_payment_v1(header: str, quote: Quote) -> PaymentPayload:
    """A v1 ``X-PAYMENT``, bound by scheme and (legacy) network to this offer and carried on as
    the v2 payload it is equivalent to: the EIP-3009 authorization is the same in both versions.
    v1 payloads carry no ``accepted``, so amount and recipient are bound by the facilitator's
    exact checks of the signed authorization."""
    try:
        v1 = decode_payment_header_v1(header)
    except PaymentDecodeError as exc:
        raise GatewayError(exc.code, exc.message, status=400) from None
    if v1.x402_version != 1:
        raise GatewayError("invalid_x402_version", "X-PAYMENT carries x402 v1 payloads; send v2 as PAYMENT-SIGNATURE")
    if v1.scheme != quote.requirements.scheme or to_caip2(v1.network) != quote.requirements.network:
        raise PaymentChallenge(
            quote,
            "payment_requirements_mismatch",
            f"the payment is for {v1.scheme} on {v1.network}; this offer is {quote.requirements.scheme} "
            f"on {quote.requirements.network}",
            field="network" if v1.scheme == quote.requirements.scheme else "scheme",
        )
    return PaymentPayload(x402_version=X402_VERSION, accepted=quote.requirements, payload=v1.payload)


def bind(quote: Quote, payload: PaymentPayload) -> None:
    differs = mismatch(quote.requirements, payload)
    if differs is not None:
        raise PaymentChallenge(
            quote,
            "payment_requirements_mismatch",
            f"the payment was made for a different offer ({differs} differs); pay this offer",
            field=differs,
        )


def payment_identifier(payload: PaymentPayload) -> str | None:
    """The client's ``payment-identifier`` (x402 extension), if it sent one; a malformed id is a 400."""
    extension = (payload.extensions or {}).get(PAYMENT_IDENTIFIER)
    if extension is None:
        return None
    info = extension.get("info") if isinstance(extension, dict) else None
    identifier = info.get("id") if isinstance(info, dict) else None
    if identifier is None:
        return None
    if not isinstance(identifier, str) or not _IDENTIFIER.fullmatch(identifier):
        raise GatewayError(
            "invalid_payment_identifier",
            "payment-identifier id must be 16-128 characters of A-Z, a-z, 0-9, '_' and '-'",
        )
    return identifier
