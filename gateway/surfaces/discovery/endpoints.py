"""The discovery endpoints: every format answered from the pipeline's compiled catalog, each document
built on its first request and kept (per format and base URL) for the life of the app."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from catalog import Tool
from gateway.errors import GatewayError
from gateway.protocol.bazaar import BAZAAR
from gateway.surfaces.discovery.llms import llms_text
from gateway.surfaces.discovery.offers import offer_prices, price_facts
from gateway.surfaces.discovery.openapi import HOW_TO_PAY, openapi_document
from gateway.surfaces.discovery.requests import advertised_schema
from gateway.surfaces.discovery.users import user_auth_facts
from gateway.surfaces.search import CANDIDATES, TOKEN_ESTIMATE, ToolSearch, estimate_tokens, fit, search_request
from settlement.x402.digits import is_digits

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

__all__ = ["CACHED_BASES", "DISCOVERY_LIMIT_DEFAULT", "DISCOVERY_LIMIT_MAX", "X402_VERSION", "Discovery"]

X402_VERSION = 2
DISCOVERY_LIMIT_DEFAULT = 20
DISCOVERY_LIMIT_MAX = 100
# Query parameters that make GET /tools a search (gateway.surfaces.search) rather than the full list.
SEARCH_PARAMETERS = ("q", "limit", "budget")
# Documents kept per format: one for each base URL they were asked under (the public URL, or the
# Host a client used), the oldest dropped past this. A catalog changes only with a restart.
CACHED_BASES = 4


class Discovery:
    """Answers every discovery format from the pipeline's compiled catalog."""

    def __init__(
        self, pipeline: Pipeline, public_url: str | None = None, search: ToolSearch | None = None,
        receipts: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.receipts = receipts  # base URL → the receipts entry of /.well-known/x402 (signer, how to fetch)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.last_updated = int(time.time())
        self.search = search or ToolSearch(self._tools)
        self._sizes: dict[str, int] = {}  # tool name → its function definition's size in tokens
        # (format, base URL) → the document: built on its first request, not at start-up, and kept,
        # since with thousands of tools one build takes longer than thousands of paid requests.
        self._documents: dict[tuple[str, str], Any] = {}

    def base_url(self, request: Request) -> str:
        return self.public_url or str(request.base_url).rstrip("/")

    def _document(self, name: str, base: str, build: Callable[[], Any]) -> Any:
        key = (name, base)
        document = self._documents.get(key)
        if document is None:
            same_format = [k for k in self._documents if k[0] == name]
            if len(same_format) >= CACHED_BASES:
                del self._documents[same_format[0]]
            document = self._documents[key] = build()
        return document

    def _json(self, name: str, base: str, build: Callable[[], Any]) -> Response:
        body = self._document(name, base, lambda: JSONResponse(build()).body)
        return Response(body, media_type="application/json")

    def _tools(self) -> list[Tool]:
        return [compiled.tool for compiled in self.pipeline.tools.values()]

    def price(self, tool: Tool) -> dict[str, Any]:
        terms = tool.payment
        return {
            **price_facts(tool, terms, tool.price_atomic),  # amount and atomic, or priceRule and priceText
            "asset": terms.asset,
            "assetName": terms.asset_name,
            "decimals": terms.decimals,
            "network": terms.network,
            "payTo": terms.pay_to,
            "scheme": terms.scheme,
            "settle": tool.settle,
            # several ways to pay: every one (the first is the fields above); none for a single offer
            **({"offers": offer_prices(tool)} if tool.alternatives else {}),
        }

    def accepts(self, tool: Tool) -> list[dict[str, Any]]:
        # Every offer without the per-request binding: a listing is not a request.
        return [requirements.to_wire() for requirements in self.pipeline.tools[tool.name].offer.options]

    def function(self, tool: Tool) -> dict[str, Any]:
        """The part of a /tools entry a model is given: OpenAI's function definition."""
        return {"name": tool.name, "description": tool.description, "parameters": advertised_schema(tool)}

    def tokens(self, tool: Tool) -> int:
        """The function definition's size in tokens (``gateway.surfaces.search.estimate_tokens``)."""
        size = self._sizes.get(tool.name)
        if size is None:
            size = self._sizes[tool.name] = estimate_tokens({"type": "function", "function": self.function(tool)})
        return size

    def tool_entry(self, tool: Tool, base: str) -> dict[str, Any]:
        price = self.price(tool)
        entry: dict[str, Any] = {
            "type": "function",
            "function": self.function(tool),
            "tokens": self.tokens(tool),
            "method": tool.method,
            "path": tool.path,
            "url": base + tool.path,
            **({"price": price["amount"], "priceAtomic": price["atomic"]} if "amount" in price
               else {"priceRule": price["priceRule"], "priceText": price["priceText"]}),
            "asset": price["asset"],
            "assetName": price["assetName"],
            "decimals": price["decimals"],
            "network": price["network"],
            "payTo": price["payTo"],
            "scheme": price["scheme"],
            "settle": tool.settle,
            **({"stream": True} if tool.stream else {}),  # the answer is relayed as it arrives (SSE)
            # paid once, got again free within the window by signing in (sign-in-with-x)
            **({"reaccess": {"windowSeconds": tool.reaccess.window, "match": tool.reaccess.match}} if tool.reaccess else {}),
            **{k: price[k] for k in ("maximum", "usage", "chargeText") if k in price},  # an upto tool's
            **{k: price[k] for k in ("assetTransferMethod",) if k in price},  # a token paid through Permit2
        }
        if "offers" in price:
            entry["offers"] = price["offers"]
        if tool.output_schema:
            entry["outputSchema"] = tool.output_schema
        if tool.user_auth is not None:
            entry["userAuth"] = user_auth_facts(tool)
        return entry

    def tools(self, request: Request) -> Response:
        if any(name in request.query_params for name in SEARCH_PARAMETERS):
            return self.search_tools(request)
        base = self.base_url(request)
        return self._json("tools", base, lambda: {
            "x402Version": X402_VERSION,
            "tools": [self.tool_entry(tool, base) for tool in self._tools()],
            "howToPay": HOW_TO_PAY,
            "mcp": base + "/mcp",
        })

    def search_tools(self, request: Request) -> Response:
        """``GET /tools?q=words&limit=10&budget=2000``: the best tools for the words, each entry as in
        the full list plus its ``score``; with a budget, only those whose ``tokens`` fit it."""
        params = request.query_params
        wanted = search_request(params.get("q"), params.get("limit"), params.get("budget"))
        base = self.base_url(request)
        ranked = self.search.search(wanted.query, CANDIDATES if wanted.budget else wanted.limit)
        hits = fit(ranked, lambda hit: self.tokens(hit.tool), wanted.limit, wanted.budget)
        entries = [{**self.tool_entry(hit.tool, base), "score": round(hit.score, 4)} for hit in hits]
        return JSONResponse({
            "x402Version": X402_VERSION,
            "tools": entries,
            "search": {
                "query": wanted.query,
                "limit": wanted.limit,
                "budget": wanted.budget,
                "returned": len(entries),
                "tokens": sum(entry["tokens"] for entry in entries),
                "tokenEstimate": TOKEN_ESTIMATE,
                "catalogSize": len(self.pipeline.tools),
            },
            "howToPay": HOW_TO_PAY,
            "mcp": base + "/mcp",
        })

    def openapi(self, request: Request) -> Response:
        base = self.base_url(request)
        return self._json("openapi", base, lambda: self.openapi_document(base))

    def openapi_document(self, base: str) -> dict[str, Any]:
        descriptions = [c.description for c in self.pipeline.catalogs.catalogs if c.description]
        return openapi_document(self._tools(), descriptions, base, self.price)

    # bazaar -------------------------------------------------------------------------------

    def item(self, tool: Tool, base: str) -> dict[str, Any]:
        return {
            "resource": base + tool.path,
            "type": "http",
            "x402Version": X402_VERSION,
            "accepts": self.accepts(tool),
            "lastUpdated": self.last_updated,
            "metadata": {
                "name": tool.name,
                "description": tool.description,
                "method": tool.method,
                "pathParams": list(tool.path_params),
                "inputSchema": tool.input_schema,
                **({"outputSchema": tool.output_schema} if tool.output_schema else {}),
                # priced by a rule: accepts states a count of 1; each call's 402 its arguments' price
                **({k: v for k, v in self.price(tool).items() if k in ("priceRule", "priceText")}),
                "bazaar": self.pipeline.tools[tool.name].offer.extensions[BAZAAR]["info"],
            },
        }

    def resources(self, request: Request) -> Response:
        params = request.query_params
        limit = _int_param(params.get("limit"), "limit", DISCOVERY_LIMIT_DEFAULT, 1, DISCOVERY_LIMIT_MAX)
        offset = _int_param(params.get("offset"), "offset", 0, 0, 10**9)
        kind = params.get("type")
        base = self.base_url(request)
        items: list[dict[str, Any]] = self._items(base) if kind in (None, "", "http") else []
        for name in ("network", "payTo", "scheme", "asset"):
            wanted = params.get(name)
            if wanted:
                items = [i for i in items if any(str(a.get(name, "")).lower() == wanted.lower() for a in i["accepts"])]
        return JSONResponse({
            "x402Version": X402_VERSION,
            "items": items[offset : offset + limit],
            "pagination": {"limit": limit, "offset": offset, "total": len(items)},
        })

    def _items(self, base: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._document("items", base, lambda: [self.item(t, base) for t in self._tools()])
        return items

    def well_known(self, request: Request) -> Response:
        base = self.base_url(request)
        return self._json("well_known", base, lambda: {
            "version": 1,
            "x402Version": X402_VERSION,
            "resources": [base + tool.path for tool in self._tools()],
            "items": self._items(base),
            "discovery": {
                "resources": base + "/discovery/resources",
                "tools": base + "/tools",
                "openapi": base + "/openapi.json",
                "mcp": base + "/mcp",
                "llms": base + "/llms.txt",
            },
            "instructions": HOW_TO_PAY,
            **({"receipts": self.receipts(base)} if self.receipts is not None else {}),
        })

    def llms_txt(self, request: Request) -> Response:
        base = self.base_url(request)
        text: str = self._document("llms", base, lambda: llms_text(self._tools(), base, self.price))
        return PlainTextResponse(text, media_type="text/plain; charset=utf-8")

    def routes(self) -> list[Route]:
        async def tools(request: Request) -> Response:
            try:
                return self.tools(request)
            except GatewayError as err:  # a search's bad q, limit or budget
                return err.to_response()

        async def openapi(request: Request) -> Response:
            return self.openapi(request)

        async def well_known(request: Request) -> Response:
            return self.well_known(request)

        async def resources(request: Request) -> Response:
            try:
                return self.resources(request)
            except GatewayError as err:
                return err.to_response()

        async def llms(request: Request) -> Response:
            return self.llms_txt(request)

        return [
            Route("/tools", tools, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/.well-known/x402", well_known, methods=["GET"]),
            Route("/discovery/resources", resources, methods=["GET"]),
            Route("/llms.txt", llms, methods=["GET"]),
        ]


def _int_param(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    if not is_digits(raw, 12) or not low <= int(raw) <= high:
        raise GatewayError(
            "invalid_parameter",
            f"{name} must be an integer from {low} to {high}",
            fields=[{"field": name, "problem": f"expected an integer from {low} to {high}, got {raw[:40]!r}"}],
        )
    return int(raw)
