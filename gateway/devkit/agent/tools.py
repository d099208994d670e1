"""A gateway's ``GET /tools``, as the agent reads it: discover the tools, and call one by name,
paying only to the advertised payee and at most the advertised price."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from gateway.devkit.agent.offers import UntrustedOffer
from gateway.devkit.agent.paying import CallResult, PayingAgent

__all__ = ["DiscoveredTool", "call_tool", "discover", "example_arguments"]


@dataclass(frozen=True)
class DiscoveredTool:
    """One entry of a gateway's ``GET /tools``: what the agent needs to call and pay for it.

    These are the gateway's claims: the agent pays only within what they promise (payTo, price)
    and never takes a token fact (decimals, network, asset) from them."""

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
    try:
        return [DiscoveredTool.from_entry(entry) for entry in response.json()["tools"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UntrustedOffer(f"{gateway_url}/tools is not a valid tool list") from None


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
    """Call a discovered tool with ``arguments``, paying its 402 within the agent's limits, and
    only to the payee and at most the price ``/tools`` advertised."""
    from gateway.surfaces.discovery import tool_request

    request = tool_request(tool.method, tool.url, arguments)
    kwargs: dict[str, Any] = {}
    if request.body:
        kwargs = {"content": request.body, "headers": {"content-type": "application/json"}}
    return await agent.call(
        client, request.method, request.target, expect_pay_to=tool.pay_to, expect_max_amount=tool.price_atomic, **kwargs
    )
