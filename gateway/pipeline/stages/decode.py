"""Stage ``decode_and_bind``: read the payment off the request, bind it to this offer, recover its signer.

Writes ``ctx.payload`` and ``ctx.paid``. Who signed is recovered offline, over this offer's own
token domain, before anything is keyed on the payer: payer and nonce are public once a payment
settles, so a header naming them proves nothing, and a junk signature costs no lookup, lock,
rate-limit token or RPC. Stops with 400 (not a payment) or 402 (another offer; a bad signature).
"""

from __future__ import annotations

from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.headers import PAYMENT_SIGNATURE, X_PAYMENT
from gateway.pipeline.context import Paid, RequestContext
from gateway.pipeline.stages.exactly_once import request_fingerprint
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.payment import (
    bind,
    decode_payment,
    decode_payment_v1,
    payment_identifier,
)
from settlement.errors import PaymentDecodeError
from settlement.schemes.signatures import SignerCheck
from settlement.x402.codec import parse_exact_evm

__all__ = ["DecodeAndBind"]


class DecodeAndBind:
    name = "decode_and_bind"
    shape_only = False

    def __init__(self, signers: SignerCheck) -> None:
        self.signers = signers

    async def __call__(self, ctx: RequestContext) -> Response | None:
        request, quote = ctx.request, ctx.quote
        assert request is not None and quote is not None
        ctx.payment_received = True
        header = request.headers.get(PAYMENT_SIGNATURE)
        if header is not None:
            payload = decode_payment(header)
            bind(quote, payload)
        else:
            payload = decode_payment_v1(str(request.headers.get(X_PAYMENT)), quote)
        ctx.payload = payload
        try:
            exact = parse_exact_evm(payload)
        except PaymentDecodeError as exc:
            raise GatewayError(exc.code, exc.message) from None
        identifier = payment_identifier(payload)
        signer = self.signers.signer(quote.requirements, exact)
        if signer is None:
            raise PaymentChallenge(
                quote, "invalid_exact_evm_payload_signature",
                "the signature does not recover to authorization.from for this offer; sign the offer again",
            )
        ctx.paid = Paid(
            payload=payload, exact=exact, signer=signer, nonce=exact.authorization.nonce.lower(),
            identifier=identifier, fingerprint=request_fingerprint(ctx.method, ctx.path, ctx.query, ctx.body),
        )
        return None
