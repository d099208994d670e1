"""Reading a payment off a request: decode the header (v2 ``PAYMENT-SIGNATURE`` or v1 ``X-PAYMENT``),
bind it to this request's offer, and read the client's ``payment-identifier``.

A header that cannot be a payment is a 400 with a decode code; a payment for another offer (route,
method, price, payTo, asset, network) is a 402 carrying a fresh offer and the field that differs.
Of a tool's several offers the payer picks one: its ``accepted`` must equal one of them as a whole
(never the network of one with the asset or amount of another), and that one is the quote the
payment goes on with.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gateway.errors import GatewayError
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import PAYMENT_IDENTIFIER, Quote, mismatch
from settlement.chain.networks import to_caip2
from settlement.errors import PaymentDecodeError
from settlement.x402.codec import decode_payment_header, decode_payment_header_v1
from settlement.x402.wire import X402_VERSION, PaymentPayload, PaymentPayloadV1, PaymentRequirements

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


def decode_payment_v1(
    header: str, quote: Quote, recovers: Callable[[PaymentRequirements, PaymentPayload], bool] | None = None
) -> tuple[PaymentPayload, Quote]:
    """A v1 ``X-PAYMENT``, bound by scheme and (legacy) network to one of this tool's offers and
    carried on as the v2 payload it is equivalent to (with that offer's quote): the EIP-3009
    authorization is the same in both versions. v1 payloads carry no ``accepted``, so amount and
    recipient are bound by the facilitator's exact checks of the signed authorization. Of several
    offers on the payment's network (two tokens on one chain), the one whose amount and payee the
    authorization names, and then the one whose token domain its signature recovers under
    (``recovers``, offline), is taken."""
    try:
        v1 = decode_payment_header_v1(header)
    except PaymentDecodeError as exc:
        raise GatewayError(exc.code, exc.message, status=400) from None
    if v1.x402_version != 1:
        raise GatewayError("invalid_x402_version", "X-PAYMENT carries x402 v1 payloads; send v2 as PAYMENT-SIGNATURE")
    index = _v1_offer(quote, v1, recovers)
    if index is None:
        raise PaymentChallenge(
            quote,
            "payment_requirements_mismatch",
            f"the payment is for {v1.scheme} on {v1.network}; this offer is {quote.requirements.scheme} "
            f"on {quote.requirements.network}",
            field="network" if v1.scheme == quote.requirements.scheme else "scheme",
        )
    quote = quote.chosen(index)
    return PaymentPayload(x402_version=X402_VERSION, accepted=quote.requirements, payload=v1.payload), quote


def _v1_offer(
    quote: Quote, v1: PaymentPayloadV1, recovers: Callable[[PaymentRequirements, PaymentPayload], bool] | None
) -> int | None:
    options = quote.offer.options
    if len(options) == 1:  # one offer: as before, bound by scheme and network
        same = v1.scheme == options[0].scheme and to_caip2(v1.network) == options[0].network
        return 0 if same else None
    network = to_caip2(v1.network)
    candidates = [i for i, o in enumerate(options) if o.scheme == v1.scheme and o.network == network]
    if len(candidates) > 1:
        authorization = v1.payload.get("authorization") if isinstance(v1.payload, dict) else None
        if isinstance(authorization, dict):
            named = [
                i for i in candidates
                if str(authorization.get("value")) == options[i].amount
                and str(authorization.get("to", "")).lower() == options[i].pay_to.lower()
            ]
            candidates = named or candidates
    if len(candidates) > 1 and recovers is not None:
        for i in candidates:
            chosen = quote.chosen(i)
            if recovers(chosen.requirements, PaymentPayload(x402_version=X402_VERSION, accepted=chosen.requirements,
                                                            payload=v1.payload)):
                return i
    return candidates[0] if candidates else None


def bind(quote: Quote, payload: PaymentPayload) -> Quote:
    """The quote of the offer ``accepted`` names, equal to it as a whole; a 402 naming the first
    field that differs from the nearest offer (same network and asset, else same network) otherwise."""
    differs = mismatch(quote.requirements, payload)
    if differs is None:
        return quote
    options = quote.offer.options
    if len(options) > 1:
        for index in range(len(options)):
            chosen = quote.chosen(index)
            if mismatch(chosen.requirements, payload) is None:
                return chosen
        differs = mismatch(_nearest(quote, payload).requirements, payload)
    raise PaymentChallenge(
        quote,
        "payment_requirements_mismatch",
        f"the payment was made for a different offer ({differs} differs); "
        + ("pay one of the offers" if len(options) > 1 else "pay this offer"),
        field=differs,
    )


def _nearest(quote: Quote, payload: PaymentPayload) -> Quote:
    accepted = payload.accepted
    options = quote.offer.options
    for index, option in enumerate(options):
        if option.network == accepted.network and option.asset == accepted.asset:
            return quote.chosen(index)
    for index, option in enumerate(options):
        if option.network == accepted.network:
            return quote.chosen(index)
    return quote


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
