"""The 402 answer: the offer in ``PAYMENT-REQUIRED`` and, for readers of the body, in the body too."""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.protocol.offers import Quote

__all__ = ["PAYMENT_REQUIRED_CODE", "PaymentChallenge"]

PAYMENT_REQUIRED_CODE = "payment_required"  # the reason of a call that came without a payment


class PaymentChallenge(GatewayError):
    """A 402 carrying a fresh offer and the reason code (``payment_required`` or why a payment was
    refused); raised by any stage that wants the client to pay (again)."""

    status = 402

    def __init__(self, quote: Quote, code: str, message: str, **fields: Any) -> None:
        super().__init__(code, message, status=402, **fields)
        headers, self.required_body = quote.challenge(code)
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
