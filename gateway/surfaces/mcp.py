"""x402 over MCP: the catalog's tools as MCP tools (streamable HTTP at ``/mcp``), paid per call.

Follows the x402 MCP transport (x402-protocol.md §6.3):

* ``tools/list``: every exposed tool; ``inputSchema`` is the catalog's input schema, the price is in
  the description and in ``_meta["x402/price"]``.
* ``tools/call`` without payment: ``isError`` result whose ``structuredContent`` is the
  PaymentRequired (``content[0].text`` the same JSON).
* ``tools/call`` with ``params._meta["x402/payment"]`` = PaymentPayload (plain JSON): the tool's
  answer with ``_meta["x402/payment-response"]`` = SettleResponse.

A call is not a second implementation of the paid path: it is turned into the equivalent HTTP
request (path from the template, query or JSON body from the other arguments, the payment as
``PAYMENT-SIGNATURE``) and sent through the gateway's own ASGI app in-process. Routing, argument
validation, binding, safety, exactly-once, settlement and the ledger are the HTTP ones; only the
answer is translated back. The offer's resource URL stays the HTTP URL, which is what the payment
is bound to.
"""

from __future__ import annotations

import base64
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
from starlette.routing import Route
from starlette.types import ASGIApp

from catalog import format_amount
from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import (
    ACCEPT,
    CONTENT_TYPE,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    REQUEST_ID,
    USER_AGENT,
    lower,
)
from gateway.surfaces.discovery import tool_request

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

log = logging.getLogger("x402gw.mcp")

PAYMENT_META = "x402/payment"
PAYMENT_RESPONSE_META = "x402/payment-response"
PRICE_META = "x402/price"


def _decode(header: str) -> Any:
    try:
        return json.loads(base64.b64decode(header))
    except (ValueError, json.JSONDecodeError):
        return None


def _text(data: Any) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=json.dumps(data, separators=(",", ":")))]


class McpEndpoint:
    """The MCP server of one gateway app: its route, and the session manager the app's lifespan runs."""

    def __init__(self, pipeline: Pipeline, public_url: str | None = None) -> None:
        self.pipeline = pipeline
        self.public_url = public_url.rstrip("/") if public_url else None
        self._app: ASGIApp | None = None
        self._listed: list[types.Tool] | None = None
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
        return Route("/mcp", StreamableHTTPASGIApp(self.sessions), methods=["GET", "POST", "DELETE"])

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.sessions.run():
            yield

    # -- tools/list -------------------------------------------------------------------------

    def _tool(self, name: str) -> types.Tool:
        tool = self.pipeline.tools[name].tool
        terms = tool.payment
        price = {
            "amount": format_amount(tool.price_atomic, terms.decimals),
            "atomic": str(tool.price_atomic),
            "asset": terms.asset,
            "network": terms.network,
            "payTo": terms.pay_to,
            "scheme": "exact",
        }
        return types.Tool(
            name=tool.name,
            description=f"{tool.description} (x402: {price['amount']} {terms.asset_name} per call on {terms.network})",
            input_schema=tool.input_schema,
            _meta={PRICE_META: price},
        )

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        if self._listed is None:  # built on the first tools/list, then kept: the catalog is fixed
            self._listed = [self._tool(name) for name in self.pipeline.tools]
        return types.ListToolsResult(tools=self._listed)

    # -- tools/call -------------------------------------------------------------------------

    def _base_url(self, ctx: Any) -> str:
        if self.public_url:
            return self.public_url
        request = getattr(ctx, "request", None)
        base = getattr(request, "base_url", None)
        return str(base).rstrip("/") if base is not None else "http://127.0.0.1"

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        compiled = self.pipeline.tools.get(params.name)
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
        assert self._app is not None, "McpEndpoint.attach(app) was not called"
        transport = httpx.ASGITransport(app=self._app, client=(client.host, client.port) if client else ("127.0.0.1", 0))
        async with httpx.AsyncClient(transport=transport, base_url=self._base_url(ctx)) as http:
            response = await http.request(call.method, call.target, headers=headers, content=call.body)
        return self._result(response)

    def _result(self, response: httpx.Response) -> types.CallToolResult:
        result_meta: dict[str, Any] = {"x402gw/status": response.status_code}
        receipt = response.headers.get(PAYMENT_RESPONSE)
        if receipt is not None:
            result_meta[PAYMENT_RESPONSE_META] = _decode(receipt)
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
