"""A reference paying agent: call a tool, answer the 402 within a spend limit, keep the receipt.

    agent = PayingAgent(private_key, max_spend_atomic=50_000)
    result = await agent.call(client, "GET", "http://127.0.0.1:8402/quotes/AAPL")

Refuses offers on networks or assets it was not told to accept, and anything that would take its
total spend over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from settlement.codec import decode_header_json, encode_header
from settlement.payer import Payer
from settlement.wire import PaymentRequired, PaymentRequirements, SettleResponse


class SpendLimitExceeded(Exception):
    pass


@dataclass
class CallResult:
    method: str
    url: str
    status: int
    price_atomic: int | None
    receipt: SettleResponse | None
    body: Any

    @property
    def tx_hash(self) -> str | None:
        return self.receipt.transaction if self.receipt and self.receipt.success else None


class PayingAgent:
    def __init__(self, private_key: str, *, max_spend_atomic: int, accept_assets: set[tuple[str, str]] | None = None):
        self.payer = Payer(private_key)
        self.max_spend_atomic = max_spend_atomic
        self.spent_atomic = 0
        self.accept_assets = {(n, a.lower()) for n, a in accept_assets} if accept_assets else None

    def choose(self, required: PaymentRequired) -> PaymentRequirements:
        for option in required.accepts:
            if option.scheme != "exact":
                continue
            if self.accept_assets is not None and (option.network, option.asset.lower()) not in self.accept_assets:
                continue
            if self.spent_atomic + int(option.amount) > self.max_spend_atomic:
                raise SpendLimitExceeded(
                    f"paying {option.amount} would exceed the spend limit "
                    f"({self.spent_atomic} of {self.max_spend_atomic} spent)"
                )
            return option
        raise SpendLimitExceeded("no acceptable payment option in the offer")

    async def call(self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> CallResult:
        first = await client.request(method, url, **kwargs)
        if first.status_code != 402 or "payment-required" not in first.headers:
            return CallResult(method, url, first.status_code, None, None, _body(first))
        required = PaymentRequired.model_validate(decode_header_json(first.headers["payment-required"]))
        option = self.choose(required)
        payment = self.payer.sign(option, resource=required.resource)
        headers = dict(kwargs.pop("headers", None) or {})
        headers["PAYMENT-SIGNATURE"] = encode_header(payment)
        paid = await client.request(method, url, headers=headers, **kwargs)
        receipt = None
        if "payment-response" in paid.headers:
            receipt = SettleResponse.model_validate(decode_header_json(paid.headers["payment-response"]))
            if receipt.success:
                self.spent_atomic += int(option.amount)
        return CallResult(method, url, paid.status_code, int(option.amount), receipt, _body(paid))


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
