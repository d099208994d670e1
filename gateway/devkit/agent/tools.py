"""A gateway's ``GET /tools``, as the agent reads it: discover the tools, and call one by name,
paying only to the advertised payee and at most the advertised price.

With something to look for, the agent asks ``GET /tools?q=`` first: on a big catalog (more than
``BIG_CATALOG`` tools, as the search answer's ``catalogSize`` says) the ranked answer is what it
works from, instead of thousands of definitions; on a small one, or a gateway without search, it
reads the whole list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from gateway.devkit.agent.offers import UntrustedOffer
from gateway.devkit.agent.paying import CallResult, PayingAgent

__all__ = ["BIG_CATALOG", "DiscoveredTool", "call_tool", "discover", "example_arguments", "search_tools"]

BIG_CATALOG = 200  # tools: past this, the agent works from a search rather than the whole list
SEARCH_LIMIT = 20


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
    price: str | None  # None: a dynamic price (``price_text`` says how it is computed)
    price_atomic: int | None
    asset: str
    decimals: int
    network: str
    pay_to: str
    price_text: str | None = None
    user_auth: bool = False  # the tool acts for its end user: it needs the user's access token

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> DiscoveredTool:
        function = entry["function"]
        return cls(
            name=function["name"], description=function.get("description", ""), method=entry["method"],
            url=entry["url"], parameters=function.get("parameters") or {"type": "object"}, price=entry.get("price"),
            price_atomic=int(entry["priceAtomic"]) if "priceAtomic" in entry else None, asset=entry["asset"],
            decimals=int(entry["decimals"]), network=entry["network"], pay_to=entry["payTo"],
            price_text=entry.get("priceText"), user_auth="userAuth" in entry,
        )


async def _tool_list(
    client: httpx.AsyncClient, gateway_url: str, params: dict[str, str | int] | None = None
) -> tuple[list[DiscoveredTool], dict[str, Any]]:
    response = await client.get(gateway_url.rstrip("/") + "/tools", params=params)
    response.raise_for_status()
    try:
        document = response.json()
        return [DiscoveredTool.from_entry(entry) for entry in document["tools"]], document
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UntrustedOffer(f"{gateway_url}/tools is not a valid tool list") from None


async def search_tools(
    client: httpx.AsyncClient, gateway_url: str, query: str, limit: int = SEARCH_LIMIT, budget: int | None = None
) -> list[DiscoveredTool]:
    """The gateway's best tools for ``query`` (``GET /tools?q=``), best first."""
    params: dict[str, str | int] = {"q": query, "limit": limit}
    if budget is not None:
        params["budget"] = budget
    return (await _tool_list(client, gateway_url, params))[0]


async def discover(client: httpx.AsyncClient, gateway_url: str, query: str | None = None) -> list[DiscoveredTool]:
    """The gateway's tools: with a ``query`` and a big catalog, only the best matches (see above)."""
    if query is not None and query.strip():
        found, document = await _tool_list(client, gateway_url, {"q": query[:300], "limit": SEARCH_LIMIT})
        search = document.get("search")
        size = search.get("catalogSize") if isinstance(search, dict) else None
        if isinstance(size, int) and size > BIG_CATALOG:
            return found
    return (await _tool_list(client, gateway_url))[0]


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
    agent: PayingAgent, client: httpx.AsyncClient, tool: DiscoveredTool, arguments: dict[str, Any],
    user_token: str | None = None,
) -> CallResult:
    """Call a discovered tool with ``arguments``, paying its 402 within the agent's limits, and
    only to the payee and at most the price ``/tools`` advertised (a dynamic price: within the
    agent's per-call limit). ``user_token``: the end user's access token, sent only to a tool that
    acts for its user (``userAuth`` in ``/tools``)."""
    from gateway.surfaces.discovery import tool_request

    request = tool_request(tool.method, tool.url, arguments)
    headers: dict[str, str] = {}
    if request.body:
        headers["content-type"] = "application/json"
    if user_token is not None and tool.user_auth:
        _same_origin(client, tool)  # the user's token goes to the gateway it was meant for, nowhere else
        headers["authorization"] = f"Bearer {user_token}"
    kwargs: dict[str, Any] = {"headers": headers} if headers else {}
    if request.body:
        kwargs["content"] = request.body
    return await agent.call(
        client, request.method, request.target, expect_pay_to=tool.pay_to, expect_max_amount=tool.price_atomic, **kwargs
    )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host.lower(), url.port


def _same_origin(client: httpx.AsyncClient, tool: DiscoveredTool) -> None:
    """A gateway's ``/tools`` says where each tool is; a lying one could name another host and
    collect the end user's access token. The token is sent only to the origin the agent was told
    to use (``--gateway``): a tool listed elsewhere is refused before any request."""
    target = httpx.URL(tool.url.replace("{", "%7B").replace("}", "%7D"))
    if target.is_relative_url:
        return
    if _origin(target) != _origin(client.base_url):
        raise UntrustedOffer(
            f"the gateway lists {tool.name} at {target.scheme}://{target.host}, not at {client.base_url.scheme}://"
            f"{client.base_url.host}: the user's access token is sent only to the gateway the agent was given"
        )
