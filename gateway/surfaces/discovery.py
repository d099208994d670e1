"""Discovery: every format an agent reads, generated from the one catalog the pipeline serves.

    GET /tools                 OpenAI-style function definitions, with price, URL and pay terms
    GET /openapi.json          OpenAPI 3.1, the 402 documented, the price in ``x-x402-price``
    GET /.well-known/x402      where everything is (bazaar-style resource list and links)
    GET /discovery/resources   bazaar listing with paging (x402 facilitator discovery shape)
    GET /llms.txt              the same in plain text for a model to read

Nothing here keeps its own copy of a tool: each answer is built from ``pipeline.tools`` (the
compiled catalog), so a catalog change shows in every format and none can go stale. A document is
built on its first request and kept for the life of the app (a catalog changes with a restart):
with thousands of tools, building one takes longer than thousands of paid requests. The ``bazaar``
extension of each 402 challenge lives below both, in ``gateway.protocol.bazaar``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from catalog import Tool, format_amount
from gateway.errors import GatewayError
from gateway.protocol.bazaar import BAZAAR, carries_body
from gateway.protocol.bazaar import schema_without as _without

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

X402_VERSION = 2
DISCOVERY_LIMIT_DEFAULT = 20
DISCOVERY_LIMIT_MAX = 100
# Documents kept per format: one for each base URL they were asked under (the public URL, or the
# Host a client used), the oldest dropped past this. A catalog changes only with a restart.
CACHED_BASES = 4


# -- one tool, split the way HTTP carries it --------------------------------------------------


def _properties(tool: Tool) -> dict[str, Any]:
    properties = (tool.input_schema or {}).get("properties")
    return properties if isinstance(properties, dict) else {}


def _required(tool: Tool) -> list[str]:
    required = (tool.input_schema or {}).get("required")
    return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []


def _path_params_schema(tool: Tool) -> dict[str, Any]:
    properties = _properties(tool)
    return {
        "type": "object",
        "properties": {name: properties.get(name, {"type": "string"}) for name in tool.path_params},
        "required": list(tool.path_params),
    }


_TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The HTTP request equivalent to calling a tool with some arguments."""

    method: str
    path: str
    query: str
    body: bytes

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def tool_request(method: str, path_template: str, arguments: dict[str, Any]) -> ToolRequest:
    """Path parameters fill the template; the other arguments go to a JSON body (POST, PUT,
    PATCH) or the query string. Deterministic (sorted keys), so the same arguments always make the
    same request, and a payment bound to one is accepted on its re-sending. A path argument that is
    missing is a GatewayError (invalid_arguments), never a literal ``{name}`` sent on."""
    method = method.upper()
    path = path_template
    rest: dict[str, Any] = {}
    for name, value in arguments.items():
        token = "{" + name + "}"
        if token in path:
            path = path.replace(token, quote(_text(value), safe=""))
        else:
            rest[name] = value
    missing = _TEMPLATE_PARAM.findall(path)
    if missing:
        raise GatewayError(
            "invalid_arguments", f"missing path argument(s): {', '.join(missing)}",
            fields=[{"field": name, "problem": "required (part of the path)"} for name in missing],
        )
    if carries_body(method):
        body = json.dumps(rest, separators=(",", ":"), sort_keys=True).encode() if rest else b""
        return ToolRequest(method, path, "", body)
    pairs: list[tuple[str, str]] = []
    for name in sorted(rest):
        value = rest[name]
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, _text(item)))
    return ToolRequest(method, path, urlencode(pairs), b"")


# -- the formats ------------------------------------------------------------------------------


class Discovery:
    """Answers every discovery format from the pipeline's compiled catalog."""

    def __init__(self, pipeline: Pipeline, public_url: str | None = None) -> None:
        self.pipeline = pipeline
        self.public_url = public_url.rstrip("/") if public_url else None
        self.last_updated = int(time.time())
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
            "amount": format_amount(tool.price_atomic, terms.decimals),
            "atomic": str(tool.price_atomic),
            "asset": terms.asset,
            "assetName": terms.asset_name,
            "decimals": terms.decimals,
            "network": terms.network,
            "payTo": terms.pay_to,
            "scheme": "exact",
            "settle": tool.settle,
        }

    def accepts(self, tool: Tool) -> list[dict[str, Any]]:
        # The offer without the per-request binding: a listing is not a request.
        return [self.pipeline.tools[tool.name].offer.requirements.to_wire()]

    def tool_entry(self, tool: Tool, base: str) -> dict[str, Any]:
        price = self.price(tool)
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": tool.input_schema},
            "method": tool.method,
            "path": tool.path,
            "url": base + tool.path,
            "price": price["amount"],
            "priceAtomic": price["atomic"],
            "asset": price["asset"],
            "assetName": price["assetName"],
            "decimals": price["decimals"],
            "network": price["network"],
            "payTo": price["payTo"],
            "scheme": "exact",
            "settle": tool.settle,
        }
        if tool.output_schema:
            entry["outputSchema"] = tool.output_schema
        return entry

    def tools(self, request: Request) -> Response:
        base = self.base_url(request)
        return self._json("tools", base, lambda: {
            "x402Version": X402_VERSION,
            "tools": [self.tool_entry(tool, base) for tool in self._tools()],
            "howToPay": HOW_TO_PAY,
            "mcp": base + "/mcp",
        })

    # OpenAPI 3.1 --------------------------------------------------------------------------

    def operation(self, tool: Tool) -> dict[str, Any]:
        properties = _properties(tool)
        required = set(_required(tool))
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": properties.get(name, {"type": "string"})}
            for name in tool.path_params
        ]
        operation: dict[str, Any] = {
            "operationId": tool.name,
            "summary": tool.description.split(". ")[0][:120],
            "description": tool.description,
            "x-x402-price": self.price(tool),
            "security": [{"x402": []}],
        }
        if carries_body(tool.method):
            operation["requestBody"] = {
                "required": bool(required - set(tool.path_params)),
                "content": {"application/json": {"schema": _without(tool.input_schema, tool.path_params)}},
            }
        else:
            for name, schema in properties.items():
                if name in tool.path_params:
                    continue
                parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": schema}
                if isinstance(schema, dict) and schema.get("description"):
                    parameter["description"] = schema["description"]
                parameters.append(parameter)
        if parameters:
            operation["parameters"] = parameters
        success_schema = tool.output_schema or {}
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        operation["responses"] = {
            "2XX": {
                "description": "The upstream's answer, paid for; the settlement receipt is in PAYMENT-RESPONSE.",
                "headers": {"PAYMENT-RESPONSE": {"$ref": "#/components/headers/PAYMENT-RESPONSE"}},
                "content": {"application/json": {"schema": success_schema}},
            },
            "400": {"description": "Malformed payment header or request body.", **error},
            "402": {
                "description": (
                    f"Payment required: {self.price(tool)['amount']} {tool.payment.asset_name} on "
                    f"{tool.payment.network}. Sign the offer in PAYMENT-REQUIRED and resend as PAYMENT-SIGNATURE."
                ),
                "headers": {"PAYMENT-REQUIRED": {"$ref": "#/components/headers/PAYMENT-REQUIRED"}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PaymentRequired"}}},
            },
            "409": {"description": "The payment is in flight, already used, or its payment-identifier conflicts.", **error},
            "422": {"description": "The arguments do not match the input schema; nothing is charged.", **error},
            "503": {"description": "Settlement, facilitator or ledger unavailable or pending; see retryAfter.", **error},
            "default": {"description": "Any other refusal, with a code and the next step.", **error},
        }
        return operation

    def openapi(self, request: Request) -> Response:
        base = self.base_url(request)
        return self._json("openapi", base, lambda: self.openapi_document(base))

    def openapi_document(self, base: str) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for tool in self._tools():
            paths.setdefault(tool.path, {})[tool.method.lower()] = self.operation(tool)
        descriptions = [c.description for c in self.pipeline.catalogs.catalogs if c.description]
        document = {
            "openapi": "3.1.0",
            "info": {
                "title": "x402gw paid tools",
                "version": "1",
                "description": ("; ".join(descriptions) + ". " if descriptions else "") + HOW_TO_PAY,
            },
            "servers": [{"url": base}],
            "paths": paths,
            "components": COMPONENTS,
        }
        return document

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
        })

    def llms_txt(self, request: Request) -> Response:
        base = self.base_url(request)
        text: str = self._document("llms", base, lambda: self.llms_text(base))
        return PlainTextResponse(text, media_type="text/plain; charset=utf-8")

    def llms_text(self, base: str) -> str:
        lines = [
            "# x402gw paid tools",
            "",
            (f"> Paid API tools at {base}. Each call is paid separately in a stablecoin over x402 v2; "
            "nothing is charged unless the call succeeds."),
            "",
            "## How to pay",
            "",
            ("1. Call the tool's URL with its arguments (path parameters in the path; query string for GET and "
            "DELETE; a JSON object body for POST, PUT and PATCH)."),
            ("2. The gateway answers HTTP 402 with a PAYMENT-REQUIRED header: base64 of a JSON PaymentRequired. "
            "Its accepts[0] is the offer: network, asset, amount (atomic units), payTo."),
            ("3. Sign an EIP-3009 transferWithAuthorization for exactly that offer (EIP-712 domain: accepts[0].extra "
            "name and version, the network's chain id, verifyingContract = asset), and resend the same request "
            "with PAYMENT-SIGNATURE: base64 of the JSON PaymentPayload whose `accepted` is accepts[0] unchanged."),
            "4. The answer carries PAYMENT-RESPONSE (base64 JSON SettleResponse with the transaction hash).",
            ("5. Refusals are JSON with `error` (a code), `message` and `next` (what to do: pay, fix_arguments, "
            "retry after `retryAfter` seconds, ...)."),
            "",
            (f"Over MCP (streamable HTTP at {base}/mcp) an unpaid tools/call returns isError with the PaymentRequired "
            "in structuredContent; call again with params._meta[\"x402/payment\"] = the PaymentPayload (plain JSON)."),
            "",
            "## Tools",
            "",
        ]
        for tool in self._tools():
            price = self.price(tool)
            lines.append(
                f"### {tool.name}\n\n{tool.description}\n\n"
                f"- {tool.method} {base}{tool.path}\n"
                f"- price: {price['amount']} {tool.payment.asset_name} ({price['atomic']} atomic units of "
                f"{price['asset']}) on {price['network']}, paid to {price['payTo']}"
                + (" — settled before the call (side effects)" if tool.settle == "upfront" else "")
            )
            required = set(_required(tool))
            for name, schema in _properties(tool).items():
                kind = schema.get("type", "any") if isinstance(schema, dict) else "any"
                note = schema.get("description", "") if isinstance(schema, dict) else ""
                where = "path" if name in tool.path_params else ("body" if carries_body(tool.method) else "query")
                lines.append(
                    f"- argument `{name}` ({kind}, {where}, {'required' if name in required else 'optional'})"
                    + (f": {note}" if note else "")
                )
            lines.append("")
        lines += [
            "## Machine-readable formats",
            "",
            f"- {base}/tools (OpenAI-style function definitions with prices)",
            f"- {base}/openapi.json (OpenAPI 3.1, price in x-x402-price)",
            f"- {base}/mcp (MCP, streamable HTTP)",
            f"- {base}/discovery/resources and {base}/.well-known/x402 (x402 bazaar listing)",
            "",
        ]
        return "\n".join(lines)

    def routes(self) -> list[Route]:
        async def tools(request: Request) -> Response:
            return self.tools(request)

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
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise GatewayError(
            "invalid_parameter",
            f"{name} must be an integer from {low} to {high}",
            fields=[{"field": name, "problem": f"expected an integer from {low} to {high}, got {raw[:40]!r}"}],
        )
    return int(raw)


HOW_TO_PAY = (
    "Every tool is paid per call over x402 v2 (scheme exact, EIP-3009 on EVM): call it, answer the 402's "
    "PAYMENT-REQUIRED offer with a signed PAYMENT-SIGNATURE, get the answer and a PAYMENT-RESPONSE receipt."
)

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "Stable snake_case code"},
        "message": {"type": "string"},
        "next": {
            "type": "object",
            "description": "What to do next",
            "properties": {"action": {"type": "string"}},
            "required": ["action"],
        },
        "fields": {"type": "array", "items": {"type": "object"}},
        "retryAfter": {"type": "number"},
        "transaction": {"type": "string"},
        "paymentId": {"type": "integer"},
    },
    "required": ["error", "message"],
}

_REQUIREMENTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scheme": {"type": "string"},
        "network": {"type": "string"},
        "amount": {"type": "string", "pattern": "^[0-9]+$"},
        "asset": {"type": "string"},
        "payTo": {"type": "string"},
        "maxTimeoutSeconds": {"type": "integer"},
        "extra": {"type": "object"},
    },
    "required": ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds"],
}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "x402": {
            "type": "apiKey",
            "in": "header",
            "name": "PAYMENT-SIGNATURE",
            "description": "x402 v2 payment: base64 of the JSON PaymentPayload answering this operation's 402 offer.",
        }
    },
    "headers": {
        "PAYMENT-REQUIRED": {
            "description": "base64 of the JSON PaymentRequired (x402 v2): the offer to sign.",
            "required": True,
            "schema": {"type": "string"},
        },
        "PAYMENT-RESPONSE": {
            "description": "base64 of the JSON SettleResponse: the settlement receipt with the transaction hash.",
            "schema": {"type": "string"},
        },
    },
    "schemas": {
        "Error": _ERROR_SCHEMA,
        "PaymentRequirements": _REQUIREMENTS_SCHEMA,
        "PaymentRequired": {
            "type": "object",
            "properties": {
                "x402Version": {"type": "integer"},
                "error": {"type": "string"},
                "resource": {
                    "type": "object",
                    "properties": {"url": {"type": "string"}, "description": {"type": "string"}, "mimeType": {"type": "string"}},
                    "required": ["url"],
                },
                "accepts": {"type": "array", "items": {"$ref": "#/components/schemas/PaymentRequirements"}},
                "extensions": {"type": "object"},
                "message": {"type": "string"},
                "next": {"type": "object"},
            },
            "required": ["x402Version", "accepts"],
        },
    },
}
