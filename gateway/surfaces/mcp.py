"""x402 over MCP: the catalog's tools as MCP tools (streamable HTTP at ``/mcp``), paid per call.

Follows the x402 MCP transport (x402-protocol.md §6.3):

* ``tools/list``: every exposed tool, ``PAGE_SIZE`` a page (``nextCursor``, passed back as
  ``cursor``; a cursor this server did not make, or made for another catalog, is JSON-RPC -32602);
  ``inputSchema`` is the catalog's input schema, the price is in the description and in
  ``_meta["x402/price"]``, the definition's estimated size in tokens in ``_meta["x402gw/tokens"]``.
* ``search_tools`` (first on the first page, free: no price, never a 402): the best tools for a few
  words, as ``tools/list`` would list them (``gateway.surfaces.search``; a catalog tool of the same
  name takes precedence and search is then offered over HTTP only).
* ``tools/call`` without payment: ``isError`` result whose ``structuredContent`` is the
  PaymentRequired (``content[0].text`` the same JSON).
* ``tools/call`` with ``params._meta["x402/payment"]`` = PaymentPayload (plain JSON): the tool's
  answer with ``_meta["x402/payment-response"]`` = SettleResponse (and, with a receipt key,
  ``_meta["x402gw/receipt"]`` = the gateway-signed receipt, as in ``X402GW-Receipt``).

The transport reads a request's body whole before parsing it, so ``/mcp`` is guarded like the paid
path: a body over ``max_body_bytes`` (declared in Content-Length, or counted as it arrives) is a 413
``request_too_large`` in the paid path's JSON shape before the MCP SDK sees any of it.

A call is not a second implementation of the paid path: it is turned into the equivalent HTTP
request (path from the template, query or JSON body from the other arguments, the payment as
``PAYMENT-SIGNATURE``) and sent through the gateway's own ASGI app in-process. Routing, argument
validation, binding, safety, exactly-once, settlement and the ledger are the HTTP ones; only the
answer is translated back. The offer's resource URL stays the HTTP URL, which is what the payment
is bound to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import (
    StreamableHTTPASGIApp,
    StreamableHTTPSessionManager,
)
from mcp.shared.exceptions import MCPError
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import (
    ACCEPT,
    AUTHORIZATION,
    CONTENT_TYPE,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    REQUEST_ID,
    USER_AGENT,
    X402GW_RECEIPT,
    lower,
)
from gateway.surfaces.discovery import advertised_schema, offer_prices, price_facts, tool_request
from gateway.surfaces.discovery.users import user_auth_facts, user_auth_sentence
from gateway.surfaces.mcp_streams import ledger_outcome, split_settlement_event
from gateway.surfaces.search import (
    BUDGET_MAX,
    CANDIDATES,
    LIMIT_MAX,
    QUERY_MAX_CHARS,
    TOKEN_ESTIMATE,
    ToolSearch,
    estimate_tokens,
    fit,
    search_request,
)

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

log = logging.getLogger("x402gw.mcp")

PAYMENT_META = "x402/payment"
PAYMENT_RESPONSE_META = "x402/payment-response"
PRICE_META = "x402/price"
USER_AUTH_META = "x402gw/userAuth"  # a tool that acts for its user: the token it needs
TOKENS_META = "x402gw/tokens"
FREE_META = "x402gw/free"
SEARCH_TOOL = "search_tools"
PAGE_SIZE = 100


def _decode(header: str) -> Any:
    try:
        return json.loads(base64.b64decode(header))
    except (ValueError, json.JSONDecodeError):
        return None


def _text(data: Any) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=json.dumps(data, separators=(",", ":")))]


def _tokens(name: str, description: str, input_schema: Any) -> int:
    """An MCP tool definition's size in tokens: what a client hands its model (gateway.surfaces.search)."""
    return estimate_tokens({"name": name, "description": description, "inputSchema": input_schema})


class BodyLimit:
    """An ASGI app whose HTTP request bodies may not exceed ``max_bytes``: 413 ``request_too_large``
    (the paid path's refusal) when Content-Length says more, or when the bytes received so far do.
    The body (at most ``max_bytes``) is read here, then handed to ``app`` as it came."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refuse(self) -> Response:
        return GatewayError(codes.REQUEST_TOO_LARGE, f"request bodies are limited to {self.max_bytes} bytes").to_response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse()(scope, receive, send)
            return
        received: list[Message] = []
        size = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: handed on, the app sees it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)


class McpEndpoint:
    """The MCP server of one gateway app: its route, and the session manager the app's lifespan runs."""

    def __init__(
        self, pipeline: Pipeline, public_url: str | None = None, search: ToolSearch | None = None,
        page_size: int = PAGE_SIZE, max_body_bytes: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes if max_body_bytes is not None else pipeline.max_body_bytes
        self.public_url = public_url.rstrip("/") if public_url else None
        self.search = search or ToolSearch(lambda: [compiled.tool for compiled in pipeline.tools.values()])
        self.page_size = page_size
        self._app: ASGIApp | None = None
        self._listed: list[types.Tool] | None = None
        self._by_name: dict[str, types.Tool] = {}
        self._catalog_id = ""
        self.server: Server[Any] = Server(
            "x402gw",
            version="1",
            instructions=(
                "Paid tools. An unpaid tools/call answers isError with the x402 PaymentRequired in "
                "structuredContent; sign accepts[0] and call again with _meta['x402/payment'] = PaymentPayload."
            ),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        # Stateless: any replica can answer any call (no session affinity behind a load balancer).
        self.sessions = StreamableHTTPSessionManager(app=self.server, stateless=True, json_response=True)

    def attach(self, app: ASGIApp) -> None:
        """The app tools/call sends its HTTP requests through (the gateway app itself)."""
        self._app = app

    def route(self) -> Route:
        guarded = BodyLimit(StreamableHTTPASGIApp(self.sessions), self.max_body_bytes)
        return Route("/mcp", guarded, methods=["GET", "POST", "DELETE"])

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.sessions.run():
            yield

    # -- tools/list -------------------------------------------------------------------------

    def _tool(self, name: str) -> types.Tool:
        tool = self.pipeline.tools[name].tool
        terms = tool.payment
        price: dict[str, Any] = {
            **price_facts(tool, terms, tool.price_atomic),  # amount and atomic, or priceRule and priceText
            "asset": terms.asset,
            "network": terms.network,
            "payTo": terms.pay_to,
            "scheme": "exact",
        }
        cost = f"{price['amount']} {terms.asset_name} per call" if "amount" in price else price["priceText"]
        description = f"{tool.description} (x402: {cost} on {terms.network})"
        if tool.alternatives:  # several ways to pay: every one listed, and said in the description
            offers = price["offers"] = offer_prices(tool)
            description += "".join(f" (or {o.get('amount', 'in')} {o['assetName']} on {o['network']})" for o in offers[1:])
        meta: dict[str, Any] = {}
        if tool.user_auth is not None:  # the user's token: the MCP request's own Authorization is passed on
            description += user_auth_sentence(tool)
            meta[USER_AUTH_META] = user_auth_facts(tool)
        return types.Tool(
            name=tool.name,
            description=description,
            input_schema=advertised_schema(tool),
            _meta={PRICE_META: price, TOKENS_META: _tokens(tool.name, description, advertised_schema(tool)), **meta},
        )

    def _search_tool(self) -> types.Tool:
        description = (
            "Free (not paid): the paid tools best matching a few words, best first, each as tools/list lists it "
            "with its size in tokens (_meta['x402gw/tokens']). With budget, only the best tools whose "
            "definitions fit that many tokens."
        )
        schema = {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": QUERY_MAX_CHARS, "description": "What the tool should do"},
                "limit": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "description": "Most tools returned"},
                "budget": {"type": "integer", "minimum": 1, "maximum": BUDGET_MAX,
                           "description": "Most tokens the returned definitions may take together"},
            },
            "required": ["query"],
            "additionalProperties": False,
        }
        return types.Tool(
            name=SEARCH_TOOL, description=description, input_schema=schema,
            _meta={FREE_META: True, TOKENS_META: _tokens(SEARCH_TOOL, description, schema)},
        )

    def _listing(self) -> list[types.Tool]:
        if self._listed is None:  # built on the first tools/list, then kept: the catalog is fixed
            names = list(self.pipeline.tools)
            self._by_name = {name: self._tool(name) for name in names}
            search = [] if SEARCH_TOOL in self._by_name else [self._search_tool()]
            self._listed = search + list(self._by_name.values())
            self._catalog_id = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        return self._listed

    def _cursor(self, offset: int) -> str:
        return base64.urlsafe_b64encode(f"{self._catalog_id}:{offset}".encode()).decode("ascii")

    def _offset(self, cursor: str | None, total: int) -> int:
        """Where a cursor points; JSON-RPC invalid params for one this catalog's listing did not make."""
        if cursor is None:
            return 0
        try:
            catalog_id, _, offset = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("ascii").partition(":")
            if catalog_id == self._catalog_id and offset.isdigit() and 0 < int(offset) < total:
                return int(offset)
        except (ValueError, binascii.Error, UnicodeError):
            pass
        raise MCPError(types.INVALID_PARAMS, "invalid cursor: list again without one (the catalog may have changed)")

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        listed = self._listing()
        start = self._offset(params.cursor if params else None, len(listed))
        end = start + self.page_size
        next_cursor = self._cursor(end) if end < len(listed) else None
        return types.ListToolsResult(tools=listed[start:end], next_cursor=next_cursor)

    def _search(self, arguments: dict[str, Any]) -> types.CallToolResult:
        try:
            wanted = search_request(arguments.get("query"), arguments.get("limit"), arguments.get("budget"), text=False)
        except GatewayError as err:
            return self._refusal(err)
        self._listing()
        ranked = self.search.search(wanted.query, CANDIDATES if wanted.budget else wanted.limit)
        listed = [self._by_name[hit.tool.name] for hit in ranked]
        chosen = fit(listed, lambda tool: int((tool.meta or {})[TOKENS_META]), wanted.limit, wanted.budget)
        found = {
            "tools": [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in chosen],
            "search": {
                "query": wanted.query, "limit": wanted.limit, "budget": wanted.budget, "returned": len(chosen),
                "tokens": sum(int((tool.meta or {})[TOKENS_META]) for tool in chosen),
                "tokenEstimate": TOKEN_ESTIMATE, "catalogSize": len(self.pipeline.tools),
            },
        }
        return types.CallToolResult(content=_text(found), structured_content=found)

    # -- tools/call -------------------------------------------------------------------------

    def _base_url(self, ctx: Any) -> str:
        if self.public_url:
            return self.public_url
        request = getattr(ctx, "request", None)
        base = getattr(request, "base_url", None)
        return str(base).rstrip("/") if base is not None else "http://127.0.0.1"

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        compiled = self.pipeline.tools.get(params.name)
        if compiled is None and params.name == SEARCH_TOOL:
            return self._search(params.arguments or {})
        if compiled is None:
            return self._refusal(GatewayError(codes.NOT_FOUND, f"no tool named {params.name!r}; see tools/list"))
        tool = compiled.tool
        arguments = params.arguments or {}
        meta = dict(params.meta or {})
        headers = {lower(ACCEPT): "application/json", lower(USER_AGENT): "x402gw-mcp"}
        payment = meta.get(PAYMENT_META)
        if payment is not None:
            if not isinstance(payment, dict):
                return self._refusal(GatewayError(
                    codes.INVALID_PAYLOAD, f"_meta[{PAYMENT_META!r}] must be a PaymentPayload JSON object"
                ))
            text = json.dumps(payment, separators=(",", ":"), ensure_ascii=False)
            headers[lower(PAYMENT_SIGNATURE)] = base64.b64encode(text.encode()).decode("ascii")
        try:
            call = tool_request(tool.method, tool.path, arguments)
        except GatewayError as err:
            return self._refusal(err)
        if call.body:
            headers[lower(CONTENT_TYPE)] = "application/json"
        request = getattr(ctx, "request", None)
        client = getattr(request, "client", None)
        user_token = getattr(request, "headers", {}).get(lower(AUTHORIZATION)) if tool.user_auth is not None else None
        if user_token:  # the end user's token, for a tool that acts for its user: only there
            headers[lower(AUTHORIZATION)] = user_token
        assert self._app is not None, "McpEndpoint.attach(app) was not called"
        transport = httpx.ASGITransport(app=self._app, client=(client.host, client.port) if client else ("127.0.0.1", 0))
        async with httpx.AsyncClient(transport=transport, base_url=self._base_url(ctx)) as http:
            response = await http.request(call.method, call.target, headers=headers, content=call.body)
        if tool.settles_streamed and payment is not None and response.status_code < 400:
            return await self._metered_stream(response)  # settled by what it delivered: shown only if it settled
        return self._result(response)

    async def _metered_stream(self, response: httpx.Response) -> types.CallToolResult:
        """A paid stream settled once it ended (``gateway.surfaces.mcp_streams``): its content with the
        settlement as ``x402/payment-response``, or, unless it settled, the outcome alone, as an error."""
        sse = response.headers.get(CONTENT_TYPE, "").lower().startswith("text/event-stream")
        # The relay's event is an SSE stream's last; in any other stream the upstream's bytes could fake one.
        text, outcome = split_settlement_event(response.text) if sse else (response.text, None)
        request_id = response.headers.get(REQUEST_ID)
        if outcome is None:  # not SSE: the ledger row says (written before the stream's last byte)
            ledger = self.pipeline.ledger
            outcome = ledger_outcome(await ledger.run(ledger.by_request_id, request_id) if request_id else None)
        meta: dict[str, Any] = {"x402gw/status": response.status_code, "x402gw/requestId": request_id}
        if outcome.get("success") is True:
            meta[PAYMENT_RESPONSE_META] = outcome
            return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                        structured_content={"text": text}, is_error=False, _meta=meta)
        return types.CallToolResult(content=_text(outcome), structured_content=outcome, is_error=True, _meta=meta)

    def _result(self, response: httpx.Response) -> types.CallToolResult:
        result_meta: dict[str, Any] = {"x402gw/status": response.status_code}
        receipt = response.headers.get(PAYMENT_RESPONSE)
        if receipt is not None:
            result_meta[PAYMENT_RESPONSE_META] = _decode(receipt)
        signed = response.headers.get(X402GW_RECEIPT)
        if signed is not None:
            result_meta["x402gw/receipt"] = _decode(signed)
        request_id = response.headers.get(REQUEST_ID)
        if request_id:
            result_meta["x402gw/requestId"] = request_id
        required = response.headers.get(PAYMENT_REQUIRED)
        if response.status_code == 402 and required is not None:
            offer = _decode(required)
            return types.CallToolResult(content=_text(offer), structured_content=offer, is_error=True, _meta=result_meta)
        try:
            data: Any = response.json()
        except ValueError:
            data = {"text": response.text}
        structured = data if isinstance(data, dict) else {"result": data}
        text = response.text if response.content else json.dumps(structured)
        content: list[types.ContentBlock] = [types.TextContent(type="text", text=text)]
        return types.CallToolResult(
            content=content,
            structured_content=structured,
            is_error=response.status_code >= 400,
            _meta=result_meta,
        )

    @staticmethod
    def _refusal(error: GatewayError) -> types.CallToolResult:
        body = error.body()
        return types.CallToolResult(content=_text(body), structured_content=body, is_error=True)
