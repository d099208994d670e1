"""Stage 3, verify: decode the payment, bind it to this offer, and have the facilitator verify it.

Reads ``PAYMENT-SIGNATURE``. A header that cannot be a payment is a 400 with a decode code; a
payment for another offer (route, method, price, payTo, asset, network) or one the facilitator
rejects is a 402 carrying a fresh offer and the reason code, passed through unchanged.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.offers import Offer
from gateway.stages.challenge import PaymentChallenge
from settlement.codec import decode_payment_header
from settlement.errors import ChainUnavailable, FacilitatorUnavailable, PaymentDecodeError
from settlement.facilitator import Facilitator
from settlement.wire import X402_VERSION, PaymentPayload, VerifyResponse


def decode_payment(header: str) -> PaymentPayload:
    try:
        payload = decode_payment_header(header)
    except PaymentDecodeError as exc:
        raise GatewayError(exc.code, exc.message, status=400) from None
    if payload.x402_version != X402_VERSION:
        raise GatewayError("invalid_x402_version", f"x402Version {payload.x402_version} is not supported here; use 2")
    return payload


def bind(offer: Offer, payload: PaymentPayload, resource_url: str) -> None:
    mismatch = offer.matches(payload)
    if mismatch is not None:
        raise PaymentChallenge(
            offer,
            resource_url,
            "payment_requirements_mismatch",
            f"the payment was made for a different offer ({mismatch} differs); pay this offer",
            field=mismatch,
        )


async def verify(facilitator: Facilitator, offer: Offer, payload: PaymentPayload, resource_url: str) -> VerifyResponse:
    try:
        result = await facilitator.verify(payload, offer.requirements)
    except (ChainUnavailable, FacilitatorUnavailable) as exc:
        raise GatewayError(
            "facilitator_unavailable", "payment verification is unavailable; retry later", retryAfter=2
        ) from exc
    if not result.is_valid:
        reason = result.invalid_reason or "invalid_payment"
        raise PaymentChallenge(offer, resource_url, reason, result.invalid_message or "the payment was refused")
    return result
