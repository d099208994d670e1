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


# -- discovery: find the tools and call one by name -------------------------------------------


@dataclass(frozen=True)
class DiscoveredTool:
    """One entry of a gateway's ``GET /tools``: what the agent needs to call and pay for it."""

    name: str
    description: str
    method: str
    url: str  # template: https://gw/quotes/{symbol}
    parameters: dict[str, Any]
    price: str
    price_atomic: int
    asset: str
    decimals: int
    network: str
    pay_to: str

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> DiscoveredTool:
        function = entry["function"]
        return cls(
            name=function["name"], description=function.get("description", ""), method=entry["method"],
            url=entry["url"], parameters=function.get("parameters") or {"type": "object"}, price=entry["price"],
            price_atomic=int(entry["priceAtomic"]), asset=entry["asset"], decimals=int(entry["decimals"]),
            network=entry["network"], pay_to=entry["payTo"],
        )


async def discover(client: httpx.AsyncClient, gateway_url: str) -> list[DiscoveredTool]:
    response = await client.get(gateway_url.rstrip("/") + "/tools")
    response.raise_for_status()
    return [DiscoveredTool.from_entry(entry) for entry in response.json()["tools"]]


def example_arguments(schema: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments from the schema's own examples, defaults, consts or enums; None if a required one has none."""
    properties = schema.get("properties") or {}
    arguments: dict[str, Any] = {}
    for name, prop in properties.items():
        if not isinstance(prop, dict):
            continue
        for key in ("examples", "default", "const", "enum"):
            if key in prop:
                value = prop[key]
                arguments[name] = value[0] if key in ("examples", "enum") and isinstance(value, list) and value else value
                break
    if any(name not in arguments for name in schema.get("required") or []):
        return None
    return arguments


async def call_tool(
    agent: PayingAgent, client: httpx.AsyncClient, tool: DiscoveredTool, arguments: dict[str, Any]
) -> CallResult:
    """Call a discovered tool with ``arguments``, paying its 402 within the agent's limits."""
    from gateway.discovery import tool_request

    request = tool_request(tool.method, tool.url, arguments)
    kwargs: dict[str, Any] = {}
    if request.body:
        kwargs = {"content": request.body, "headers": {"content-type": "application/json"}}
    return await agent.call(client, request.method, request.target, **kwargs)
