"""Stage 3, verify: decode the payment, bind it to this offer, and have the facilitator verify it.

Reads ``PAYMENT-SIGNATURE``. A header that cannot be a payment is a 400 with a decode code; a
payment for another offer (route, method, price, payTo, asset, network) or one the facilitator
rejects is a 402 carrying a fresh offer and the reason code, passed through unchanged.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.protocol.offers import Quote, mismatch
from gateway.pipeline.stages.challenge import PaymentChallenge
from settlement.x402.codec import decode_payment_header, decode_payment_header_v1
from settlement.chain.networks import to_caip2
from settlement.errors import ChainUnavailable, FacilitatorUnavailable, PaymentDecodeError
from settlement.schemes.facilitator import Facilitator
from settlement.x402.wire import X402_VERSION, PaymentPayload, VerifyResponse


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


async def verify(facilitator: Facilitator, quote: Quote, payload: PaymentPayload) -> VerifyResponse:
    try:
        result = await facilitator.verify(payload, quote.requirements)
    except (ChainUnavailable, FacilitatorUnavailable) as exc:
        raise GatewayError(
            "facilitator_unavailable", "payment verification is unavailable; retry later", retryAfter=2
        ) from exc
    if not result.is_valid:
        reason = result.invalid_reason or "invalid_payment"
        raise PaymentChallenge(quote, reason, result.invalid_message or "the payment was refused")
    return result
