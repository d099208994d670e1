"""``GET /llms.txt``: the discovery documents in plain text for a model to read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from catalog import Tool
from gateway.protocol.bazaar import carries_body
from gateway.surfaces.discovery.requests import input_properties, required_inputs

__all__ = ["llms_text"]


def llms_text(tools: list[Tool], base: str, price: Callable[[Tool], dict[str, Any]]) -> str:
    """The discovery documents in plain text, for a model to read: how to pay, then every tool."""
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
    for tool in tools:
        terms = price(tool)
        lines.append(
            f"### {tool.name}\n\n{tool.description}\n\n"
            f"- {tool.method} {base}{tool.path}\n"
            f"- price: {terms['amount']} {tool.payment.asset_name} ({terms['atomic']} atomic units of "
            f"{terms['asset']}) on {terms['network']}, paid to {terms['payTo']}"
            + (" — settled before the call (side effects)" if tool.settle == "upfront" else "")
        )
        required = set(required_inputs(tool))
        for name, schema in input_properties(tool).items():
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
