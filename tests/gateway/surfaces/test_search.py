"""Tool search on a generated 10,000-tool catalog: ``GET /tools?q=``, MCP's ``search_tools`` and
``tools/list`` paging (through the official ``mcp`` client), budgets, refusals, llms.txt and the
reference agent. The gateway runs without a chain: discovery and MCP listing never pay."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from catalog import Catalogs, Tool, load_catalogs
from gateway.app import create_app
from gateway.devkit.agent import BIG_CATALOG, discover, search_tools
from gateway.ops.serving import ThreadServer
from gateway.settings import DEFAULT_CATALOG, Settings
from gateway.surfaces.discovery import llms_text
from gateway.surfaces.search import (
    LIMIT_DEFAULT,
    QUERY_MAX_CHARS,
    ToolSearch,
    estimate_tokens,
    fit,
    words,
)
from settlement.schema import open_ledger
from tests.support.tool_catalog import QUERIES, write_catalog

T = TypeVar("T")
TOTAL = 10_000


class NoFacilitator:
    """Discovery and MCP listing never reach a facilitator; this stands in so no chain is needed."""

    def supported(self) -> dict[str, Any]:
        return {"kinds": [], "extensions": [], "signers": {}}


@dataclass
class Served:
    url: str
    catalogs: Catalogs


def _serve(tmp: Path, catalog: Path) -> tuple[ThreadServer, Served, Any]:
    settings = Settings(catalog=[catalog], database_url=f"sqlite:///{tmp / (catalog.stem + '.sqlite3')}")
    catalogs = load_catalogs(settings.catalog)
    ledger = open_ledger(settings.database_url)
    app = create_app(settings, catalogs=catalogs, facilitator=NoFacilitator(), ledger=ledger)  # type: ignore[arg-type]
    server = ThreadServer(app).start()
    return server, Served(server.url, catalogs), ledger


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("search")
    server, served, ledger = _serve(tmp, write_catalog(tmp / "big.yaml", TOTAL))
    yield served
    server.stop()
    ledger.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("search-small")
    server, served, ledger = _serve(tmp, DEFAULT_CATALOG)
    yield served
    server.stop()
    ledger.close()


def get(served: Served, path: str, **params: Any) -> httpx.Response:
    return httpx.get(served.url + path, params=params, timeout=30)


def with_session(served: Served, work: Callable[[ClientSession], Awaitable[T]]) -> T:
    async def run() -> T:
        async with (
            streamable_http_client(f"{served.url}/mcp") as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await work(session)

    return asyncio.run(run())


# -- ranking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "expected"), QUERIES, ids=[q for q, _ in QUERIES])
def test_each_query_finds_its_tool_first_among_10000(big: Served, query: str, expected: str) -> None:
    response = get(big, "/tools", q=query, limit=5)
    assert response.status_code == 200, response.text
    names = [entry["function"]["name"] for entry in response.json()["tools"]]
    assert names[0] == expected, names


def test_the_queries_are_not_the_tool_names() -> None:
    assert len(QUERIES) >= 20
    for query, name in QUERIES:
        assert name.replace("_", " ") not in query.lower()


def _tool(name: str, description: str, parameter: str) -> Tool:
    tool = load_catalogs([DEFAULT_CATALOG]).tools[0]
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": parameter}}}
    return tool.model_copy(update={"name": name, "description": description, "input_schema": schema})


def test_a_word_in_the_name_outranks_the_description_which_outranks_a_parameter() -> None:
    tools = [
        _tool("list_things", "Lists things.", "a zebra filter"),
        _tool("list_items", "Lists items, zebra ones too.", "filter"),
        _tool("zebra_lookup", "Looks things up.", "filter"),
        _tool("unrelated", "Nothing here.", "filter"),
    ]
    hits = ToolSearch(lambda: tools).search("zebra", 10)
    assert [hit.tool.name for hit in hits] == ["zebra_lookup", "list_items", "list_things"]
    assert hits[0].score > hits[1].score > hits[2].score > 0


def test_identifiers_are_split_for_the_index_and_the_query() -> None:
    assert words("get_stock_quote") == ["get", "stock", "quote"]
    assert words("getStockQuote") == ["get", "stock", "quote", "getstockquote"]
    assert words("HTTPStatus v2") == ["http", "status", "httpstatus", "v", "2", "v2"]
    tools = [_tool("getStockQuote", "Price.", "x"), _tool("lookup_weather", "Weather.", "x")]
    search = ToolSearch(lambda: tools)
    assert [h.tool.name for h in search.search("stock quote", 5)] == ["getStockQuote"]
    assert [h.tool.name for h in search.search("getStockQuote", 5)] == ["getStockQuote"]
    assert search.search('weather" OR NOT *', 5)[0].tool.name == "lookup_weather"  # no FTS5 syntax gets through
    assert search.search("?!", 5) == []


# -- budgets and sizes ------------------------------------------------------------------------------


def test_every_entry_reports_its_size_in_tokens(small: Served) -> None:
    for entry in get(small, "/tools").json()["tools"]:
        definition = {"type": "function", "function": entry["function"]}
        assert entry["tokens"] == estimate_tokens(definition)
        assert entry["tokens"] >= len(json.dumps(definition, separators=(",", ":"))) / 3


def test_a_budget_keeps_the_best_tools_that_fit(big: Served) -> None:
    query = "weather forecast for a city"
    ranked = get(big, "/tools", q=query, limit=100).json()["tools"]
    sizes = [entry["tokens"] for entry in ranked]
    budget = sizes[0] + sizes[1] + sizes[2] - 1  # the best three do not fit together
    answer = get(big, "/tools", q=query, limit=100, budget=budget).json()
    chosen = answer["tools"]
    assert sum(entry["tokens"] for entry in chosen) == answer["search"]["tokens"] <= budget
    names = [entry["function"]["name"] for entry in chosen]
    ranked_names = [entry["function"]["name"] for entry in ranked]
    assert names == [n for n in ranked_names if n in names]  # rank order kept
    assert names[:2] == ranked_names[:2]  # the best that fit come first
    assert answer["search"]["budget"] == budget and answer["search"]["catalogSize"] == TOTAL
    # a budget below every tool's size: nothing fits
    assert get(big, "/tools", q=query, budget=1).json()["tools"] == []


def test_fit_skips_what_does_not_fit_and_stops_at_the_limit() -> None:
    sizes = {"a": 50, "b": 80, "c": 30, "d": 10, "e": 10}
    ranked = list(sizes)
    assert fit(ranked, sizes.__getitem__, 10, None) == ranked
    assert fit(ranked, sizes.__getitem__, 2, None) == ["a", "b"]
    assert fit(ranked, sizes.__getitem__, 10, 100) == ["a", "c", "d", "e"]
    assert fit(ranked, sizes.__getitem__, 2, 100) == ["a", "c"]


def test_a_search_without_limit_returns_the_default_number(big: Served) -> None:
    answer = get(big, "/tools", q="list invoices").json()
    assert len(answer["tools"]) == LIMIT_DEFAULT == answer["search"]["limit"]
    assert all(entry["score"] > 0 for entry in answer["tools"])


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "code", "field"), [
    ({"q": "weather", "limit": "0"}, "search_limit_invalid", "limit"),
    ({"q": "weather", "limit": "-1"}, "search_limit_invalid", "limit"),
    ({"q": "weather", "limit": "101"}, "search_limit_invalid", "limit"),
    ({"q": "weather", "limit": "ten"}, "search_limit_invalid", "limit"),
    ({"q": "weather", "limit": "1.5"}, "search_limit_invalid", "limit"),
    ({"q": "weather", "limit": "١٢"}, "search_limit_invalid", "limit"),  # not ASCII digits
    ({"q": "weather", "budget": "lots"}, "search_budget_invalid", "budget"),
    ({"q": "weather", "budget": "0"}, "search_budget_invalid", "budget"),
    ({"q": "weather", "budget": "1e3"}, "search_budget_invalid", "budget"),
    ({"q": "weather", "budget": "1000001"}, "search_budget_invalid", "budget"),
    ({"q": "w" * (QUERY_MAX_CHARS + 1)}, "search_query_invalid", "q"),
    ({"q": "   "}, "search_query_invalid", "q"),
    ({"limit": "5"}, "search_query_invalid", "q"),
])
def test_bad_search_parameters_are_refused_with_a_code(
    small: Served, params: dict[str, str], code: str, field: str
) -> None:
    response = get(small, "/tools", **params)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == code
    assert body["next"]["action"] == "fix_arguments"
    assert [f["field"] for f in body["fields"]] == [field]


def test_the_longest_query_allowed_is_answered(small: Served) -> None:
    assert get(small, "/tools", q="w" * QUERY_MAX_CHARS).status_code == 200


# -- MCP --------------------------------------------------------------------------------------------


def test_tools_list_pages_through_10000_tools_with_the_official_client(big: Served) -> None:
    async def every_page(session: ClientSession) -> list[types.ListToolsResult]:
        pages = [await session.list_tools()]
        while pages[-1].next_cursor is not None:
            pages.append(await session.list_tools(params=types.PaginatedRequestParams(cursor=pages[-1].next_cursor)))
        return pages

    pages = with_session(big, every_page)
    names = [tool.name for page in pages for tool in page.tools]
    assert names[0] == "search_tools"
    assert names[1:] == [tool.name for tool in big.catalogs.tools]  # each once, in catalog order
    assert len(pages) == 101 and all(len(page.tools) == 100 for page in pages[:-1]) and len(pages[-1].tools) == 1
    paid = pages[0].tools[1]
    assert paid.meta is not None and paid.meta["x402/price"]["atomic"] == "2000"
    assert paid.meta["x402gw/tokens"] == estimate_tokens(
        {"name": paid.name, "description": paid.description, "inputSchema": paid.input_schema}
    )


def test_an_invalid_cursor_is_a_json_rpc_invalid_params_error(big: Served) -> None:
    other_catalog = base64.urlsafe_b64encode(b"000000000000:100").decode()
    past_the_end = with_session(big, lambda s: s.list_tools()).next_cursor
    assert past_the_end is not None
    catalog_id = base64.urlsafe_b64decode(past_the_end).decode().split(":")[0]
    cursors = ["not a cursor", "%%%", other_catalog, base64.urlsafe_b64encode(f"{catalog_id}:99999".encode()).decode(),
               base64.urlsafe_b64encode(f"{catalog_id}:-1".encode()).decode()]

    async def refusals(session: ClientSession) -> list[int]:
        codes = []
        for cursor in cursors:
            try:
                await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
            except MCPError as refused:  # caught inside the session: its task group would wrap it
                codes.append(refused.code)
        return codes

    assert with_session(big, refusals) == [types.INVALID_PARAMS] * len(cursors) == [-32602] * len(cursors)


def test_search_tools_over_mcp_is_free_and_ranks(big: Served) -> None:
    async def work(session: ClientSession) -> tuple[types.Tool, types.CallToolResult, types.CallToolResult]:
        listed = (await session.list_tools()).tools[0]
        found = await session.call_tool("search_tools", {"query": "track the delivery of my parcel", "limit": 3})
        fitted = await session.call_tool("search_tools", {"query": "weather in a city", "budget": 400})
        return listed, found, fitted

    listed, found, fitted = with_session(big, work)
    assert listed.name == "search_tools" and listed.meta is not None
    assert listed.meta["x402gw/free"] is True and "x402/price" not in listed.meta
    assert not found.is_error and found.structured_content is not None
    tools = found.structured_content["tools"]
    assert [t["name"] for t in tools][0] == "track_package" and len(tools) == 3
    assert tools[0]["_meta"]["x402/price"]["atomic"] == "2000"  # as tools/list lists it
    assert fitted.structured_content is not None
    sizes = [t["_meta"]["x402gw/tokens"] for t in fitted.structured_content["tools"]]
    assert sizes and sum(sizes) == fitted.structured_content["search"]["tokens"] <= 400


@pytest.mark.parametrize(("arguments", "code"), [
    ({}, "search_query_invalid"),
    ({"query": 7}, "search_query_invalid"),
    ({"query": "x" * (QUERY_MAX_CHARS + 1)}, "search_query_invalid"),
    ({"query": "weather", "limit": 0}, "search_limit_invalid"),
    ({"query": "weather", "limit": True}, "search_limit_invalid"),
    ({"query": "weather", "limit": "5"}, "search_limit_invalid"),
    ({"query": "weather", "budget": -5}, "search_budget_invalid"),
    ({"query": "weather", "budget": 2.5}, "search_budget_invalid"),
])
def test_bad_search_tools_arguments_are_refused_with_a_code(
    small: Served, arguments: dict[str, Any], code: str
) -> None:
    result = with_session(small, lambda s: s.call_tool("search_tools", arguments))
    assert result.is_error and result.structured_content is not None
    assert result.structured_content["error"] == code


# -- llms.txt and the reference agent ---------------------------------------------------------------


def test_llms_txt_of_a_big_catalog_says_how_to_search(big: Served, small: Served) -> None:
    text = get(big, "/llms.txt").text
    assert "## Finding a tool" in text and f"{big.url}/tools?q=" in text and "search_tools" in text
    assert "### " not in text and len(text) < 10_000
    assert "### get_quote" in get(small, "/llms.txt").text  # a small one still lists every tool


def test_llms_text_switches_at_its_threshold() -> None:
    tools = list(load_catalogs([DEFAULT_CATALOG]).tools)

    def price(tool: Tool) -> dict[str, Any]:
        return {"amount": "0.002", "atomic": "2000", "asset": "0x", "network": "n", "payTo": "0x"}

    assert "## Tools" in llms_text(tools, "http://gw", price, list_max=len(tools))
    assert "## Finding a tool" in llms_text(tools, "http://gw", price, list_max=len(tools) - 1)


def test_the_agent_searches_a_big_catalog_and_reads_a_small_one_whole(big: Served, small: Served) -> None:
    async def run(served: Served, query: str) -> tuple[list[str], list[str]]:
        asked: list[str] = []

        async def record(request: httpx.Request) -> None:
            asked.append(str(request.url.copy_with(scheme=None, host=None, port=None)))

        async with httpx.AsyncClient(timeout=30, event_hooks={"request": [record]}) as client:
            tools = await discover(client, served.url, query=query)
        return [t.name for t in tools], asked

    names, asked = asyncio.run(run(big, "how much is bitcoin worth today"))
    assert names[0] == "get_crypto_price" and len(names) <= 20 and TOTAL > BIG_CATALOG
    assert len(asked) == 1 and "/tools?q=" in asked[0]
    names, asked = asyncio.run(run(small, "stock quote"))
    assert set(names) == {tool.name for tool in small.catalogs.tools}  # the whole list
    assert len(asked) == 2 and asked[1].endswith("/tools")


def test_the_agent_finds_a_tool_by_name_in_a_big_catalog(big: Served) -> None:
    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [t.name for t in await search_tools(client, big.url, "get_stock_history", limit=5)]

    assert asyncio.run(run())[0] == "get_stock_history"
