"""The 402 answer: the offer in ``PAYMENT-REQUIRED`` and, for readers of the body, in the body too.

A tool with re-access (``catalog.reaccess``) adds a fresh sign-in-with-x challenge to every 402
(``extensions["sign-in-with-x"]``): a payer who paid within the window signs it instead of paying.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.protocol.offers import Quote
from gateway.protocol.siwx import siwx_extension

__all__ = ["PAYMENT_REQUIRED_CODE", "PaymentChallenge", "sign_in_challenge"]

PAYMENT_REQUIRED_CODE = "payment_required"  # the reason of a call that came without a payment


class PaymentChallenge(GatewayError):
    """A 402 carrying a fresh offer and the reason code (``payment_required`` or why a payment was
    refused); raised by any stage that wants the client to pay (again)."""

    status = 402

    def __init__(self, quote: Quote, code: str, message: str, **fields: Any) -> None:
        super().__init__(code, message, status=402, **fields)
        headers, self.required_body = quote.challenge(code, sign_in_challenge(quote))
        self.headers.update(headers)

    @classmethod
    def unpaid(cls, quote: Quote, price_text: str) -> PaymentChallenge:
        """The 402 of a call that came without a payment."""
        return cls(
            quote,
            PAYMENT_REQUIRED_CODE,
            f"{quote.offer.tool.name} costs {price_text} per call; sign the offer in PAYMENT-REQUIRED "
            "and send it as PAYMENT-SIGNATURE",
        )

    def body(self) -> dict[str, Any]:
        fields = {key: value for key, value in self.fields.items() if value is not None}
        return {**self.required_body, "message": self.message, **fields, "next": self.next_step()}


def sign_in_challenge(quote: Quote) -> dict[str, Any] | None:
    """The 402's sign-in-with-x extension, for a tool with re-access; else None. Fresh each time
    (nonce, issuedAt), so such a 402 is never kept (``Chain.run_shape``)."""
    tool = quote.offer.tool
    if tool.reaccess is None:
        return None
    networks = [requirements.network for requirements in quote.offer.options]
    return siwx_extension(quote.resource_url, networks, f"Sign in to get {tool.name} again without paying: you paid for it")
