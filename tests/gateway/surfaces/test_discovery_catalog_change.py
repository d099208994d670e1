"""One catalog, every format: after a restart with a changed catalog, every discovery format (and
MCP, and the 402 itself) shows the change, and nothing shows what was removed or renamed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import GatewayFactory, RunningGateway, demo_catalog, offer_of


def changed_catalog(tmp_path: Path, upstream: str) -> Path:
    """The demo catalog with get_weather renamed (new name and path), get_quote repriced, get_report removed."""
    data = yaml.safe_load(demo_catalog(tmp_path, upstream).read_text())
    tools = []
    for tool in data["tools"]:
        tool["price"] = str(tool["price"])
        if tool["name"] == "get_report":
            continue
        if tool["name"] == "get_weather":
            tool.update(name="get_forecast", path="/forecast", upstream_path="/weather",
                        description="Weather forecast for a city (renamed from the weather tool).")
        if tool["name"] == "get_quote":
            tool["price"] = "0.004"
        tools.append(tool)
    data["tools"] = tools
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mcp_tools(gateway: RunningGateway) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with (
            streamable_http_client(f"{gateway.url}/mcp") as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            listed = await session.list_tools()
            # (the free search_tools comes first: it has no price)
            return {t.name: t.meta["x402/price"]["atomic"] for t in listed.tools if t.name != "search_tools"}

    return asyncio.run(run())


def every_format(gateway: RunningGateway) -> dict[str, Any]:
    with gateway.client() as client:
        tools = client.get("/tools").json()["tools"]
        openapi = client.get("/openapi.json").json()
        resources = client.get("/discovery/resources", params={"limit": 100}).json()["items"]
        well_known = client.get("/.well-known/x402").json()
        llms = client.get("/llms.txt").text
    return {
        "tools": {t["function"]["name"]: t["priceAtomic"] for t in tools},
        "openapi": {
            op["operationId"]: op["x-x402-price"]["atomic"] for item in openapi["paths"].values() for op in item.values()
        },
        "bazaar": {i["metadata"]["name"]: i["accepts"][0]["amount"] for i in resources},
        "well_known": {i["metadata"]["name"]: i["accepts"][0]["amount"] for i in well_known["items"]},
        "mcp": mcp_tools(gateway),
        "llms": llms,
        "paths": set(openapi["paths"]),
        "resources": {r.removeprefix(gateway.url) for r in well_known["resources"]},
    }


def test_a_catalog_change_shows_in_every_format_with_nothing_stale(
    start_gateway: GatewayFactory, tmp_path: Path, upstream: str
) -> None:
    before = every_format(start_gateway())
    expected_before = {"get_quote": "2000", "get_weather": "1000", "create_order": "10000",
                       "get_report": "5000", "request_report": "3000"}
    for name in ("tools", "openapi", "bazaar", "well_known", "mcp"):
        assert before[name] == expected_before, name

    changed = start_gateway(changed_catalog(tmp_path, upstream))
    after = every_format(changed)
    expected_after = {"get_quote": "4000", "get_forecast": "1000", "create_order": "10000", "request_report": "3000"}
    for name in ("tools", "openapi", "bazaar", "well_known", "mcp"):
        assert after[name] == expected_after, name
    assert after["paths"] == after["resources"] == {"/quotes/{symbol}", "/forecast", "/orders", "/reports"}
    # (request_report's description still mentions get_report: that is the owner's text, not a listing)
    for stale in ("### get_weather", "### get_report", "/weather\n", "/reports/{report_id}", "price: 0.002 "):
        assert stale not in after["llms"], stale
    assert "### get_forecast" in after["llms"] and "price: 0.004 USD Coin" in after["llms"]

    with changed.client() as client:
        offer = offer_of(client.get("/quotes/AAPL"))
        forecast = offer_of(client.get("/forecast", params={"city": "Oslo"}))
        gone = client.get("/weather", params={"city": "Oslo"})
    assert offer.accepts[0].amount == "4000"
    assert forecast.resource.description.startswith("Weather forecast")
    assert forecast.extensions is not None
    assert forecast.extensions["bazaar"]["schema"]["properties"]["input"]["properties"]["queryParams"]["required"] == ["city"]
    assert gone.status_code == 404
