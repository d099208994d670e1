"""``GET /llms.txt``: the discovery documents in plain text for a model to read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from catalog import Tool
from gateway.protocol.bazaar import carries_body
from gateway.surfaces.discovery.requests import input_properties, required_inputs
from gateway.surfaces.discovery.users import user_auth_sentence
from gateway.surfaces.search import BUDGET_MAX, CHARS_PER_TOKEN, LIMIT_DEFAULT, LIMIT_MAX, QUERY_MAX_CHARS

__all__ = ["LLMS_LIST_MAX", "llms_text"]

# Past this many tools, llms.txt says how to search them instead of listing each (a model reading
# 10,000 tool descriptions spends its context before it gets to work).
LLMS_LIST_MAX = 200


def llms_text(
    tools: list[Tool], base: str, price: Callable[[Tool], dict[str, Any]], list_max: int = LLMS_LIST_MAX
) -> str:
    """The discovery documents in plain text, for a model to read: how to pay, then every tool (or,
    past ``list_max`` tools, how to search for the right ones)."""
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
        "with PAYMENT-SIGNATURE: base64 of the JSON PaymentPayload whose `accepted` is accepts[0] unchanged. "
        "An offer whose extra.assetTransferMethod is \"permit2\" (a token without EIP-3009) is signed as a Permit2 "
        "PermitWitnessTransferFrom instead: spender the x402 exact proxy, witness {to: payTo, validAfter}, as the "
        "official x402 clients do."),
        "4. The answer carries PAYMENT-RESPONSE (base64 JSON SettleResponse with the transaction hash).",
        ("5. Refusals are JSON with `error` (a code), `message` and `next` (what to do: pay, fix_arguments, "
        "retry after `retryAfter` seconds, ...)."),
        "",
        (f"Over MCP (streamable HTTP at {base}/mcp) an unpaid tools/call returns isError with the PaymentRequired "
        "in structuredContent; call again with params._meta[\"x402/payment\"] = the PaymentPayload (plain JSON)."),
        "",
    ]
    lines += _tool_lines(tools, base, price) if len(tools) <= list_max else _how_to_search(len(tools), base)
    lines += [
        "## Machine-readable formats",
        "",
        f"- {base}/tools (OpenAI-style function definitions with prices; ?q= to search them)",
        f"- {base}/openapi.json (OpenAPI 3.1, price in x-x402-price)",
        f"- {base}/mcp (MCP, streamable HTTP; tools/list is paged, search_tools is free)",
        f"- {base}/discovery/resources and {base}/.well-known/x402 (x402 bazaar listing)",
        "",
    ]
    return "\n".join(lines)


def _how_to_search(count: int, base: str) -> list[str]:
    return [
        "## Finding a tool",
        "",
        (f"This gateway sells {count} tools, too many to list here. Search them by what you need, in a few "
        "words; the answer is the best tools first, as OpenAI-style function definitions with price and URL:"),
        "",
        f"- GET {base}/tools?q=weather+forecast+for+a+city&limit=5",
        (f"- GET {base}/tools?q=...&budget=2000 keeps the best tools whose definitions fit 2000 tokens "
        f"(each tool's `tokens` is an estimate: its JSON definition's characters / {CHARS_PER_TOKEN}, rounded up)"),
        ("- over MCP: the free tool `search_tools` with {\"query\": \"...\", \"limit\": 5, \"budget\": 2000}; "
        "tools/list is paged (pass nextCursor back as cursor)"),
        "",
        (f"`limit` is 1 to {LIMIT_MAX} (default {LIMIT_DEFAULT}), `budget` 1 to {BUDGET_MAX:,} tokens, `q` at most "
        f"{QUERY_MAX_CHARS} characters; "
        "anything else is refused with 400 and a code (search_query_invalid, search_limit_invalid, "
        "search_budget_invalid)."),
        "",
    ]


def _tool_lines(tools: list[Tool], base: str, price: Callable[[Tool], dict[str, Any]]) -> list[str]:
    lines = ["## Tools", ""]
    for tool in tools:
        terms = price(tool)
        lines.append(
            f"### {tool.name}\n\n{tool.description}\n\n"
            f"- {tool.method} {base}{tool.path}\n"
            + (f"- price: {terms['amount']} {tool.payment.asset_name} ({terms['atomic']} atomic units of "
               f"{terms['asset']})" if "amount" in terms else f"- price: {terms['priceText']} (token {terms['asset']})")
            + f" on {terms['network']}, paid to {terms['payTo']}"
            + (" — settled before the call (side effects)" if tool.settle == "upfront" else "")
        )
        lines.extend(  # a tool's other offers (catalog.offers): accepts lists each, the payer picks one
            (f"- or: {o['amount']} {o['assetName']} ({o['atomic']} atomic units of {o['asset']})" if "amount" in o
             else f"- or: {o['assetName']} ({o['asset']}), the same rule")
            + f" on {o['network']}, "
            f"paid to {o['payTo']} ({o['scheme']})"
            for o in terms.get("offers", [])[1:]
        )
        if tool.user_auth is not None:  # the user's own token, checked before the price
            lines.append(f"- needs the user's token:{user_auth_sentence(tool).removeprefix(' (acts for its user:').rstrip(')')}")
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
    return lines
