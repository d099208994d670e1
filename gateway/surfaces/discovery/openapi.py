"""OpenAPI 3.1 for the paid tools: one operation per tool, the price in ``x-x402-price``, the 402
and its headers documented, and the shared components (error body, PaymentRequired)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from catalog import Tool
from gateway.protocol.bazaar import carries_body
from gateway.protocol.bazaar import schema_without as _without
from gateway.surfaces.discovery.requests import input_properties, required_inputs
from gateway.surfaces.discovery.users import scheme_name, security_scheme
from gateway.upstream.trimming import answer_parameters

__all__ = ["COMPONENTS", "HOW_TO_PAY", "openapi_document", "operation"]

HOW_TO_PAY = (
    "Every tool is paid per call over x402 v2 (scheme exact, EIP-3009 on EVM): call it, answer the 402's "
    "PAYMENT-REQUIRED offer with a signed PAYMENT-SIGNATURE, get the answer and a PAYMENT-RESPONSE receipt."
)


_TRIMMED_HEADER: dict[str, Any] = {
    "X402GW-Trimmed": {
        "description": "What the gateway cut at the caller's asking (x402gw_fields, x402gw_max_items, "
                       "x402gw_token_budget), e.g. 'fields, max-items=5;arrays=1;dropped=20'",
        "schema": {"type": "string"},
    }
}


def operation(tool: Tool, price: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI operation: parameters or body, the price (``x-x402-price``), the 402 documented."""
    properties = input_properties(tool)
    required = set(required_inputs(tool))
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": properties.get(name, {"type": "string"})}
        for name in tool.path_params
    ]
    spec: dict[str, Any] = {
        "operationId": tool.name,
        "summary": tool.description.split(". ")[0][:120],
        "description": tool.description,
        "x-x402-price": price,
        "security": [{"x402": []}],
    }
    if tool.user_auth is not None:  # both: the user's token (checked first) and the payment
        spec["security"] = [{"x402": [], scheme_name(tool): list(tool.user_auth.scopes)}]
    if carries_body(tool.method):
        spec["requestBody"] = {
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
    # The gateway's own: trimming of the answer, in the query whatever the method (same price).
    trimming = answer_parameters(tool)
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": schema["description"]}
        for name, schema in trimming.items()
    ]
    if parameters:
        spec["parameters"] = parameters
    success_schema = tool.output_schema or {}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    spec["responses"] = {
        "2XX": {
            "description": "The upstream's answer, paid for; the settlement receipt is in PAYMENT-RESPONSE.",
            "headers": {"PAYMENT-RESPONSE": {"$ref": "#/components/headers/PAYMENT-RESPONSE"}, **_TRIMMED_HEADER}
            if trimming else {"PAYMENT-RESPONSE": {"$ref": "#/components/headers/PAYMENT-RESPONSE"}},
            "content": {"application/json": {"schema": {} if trimming else success_schema}},
        },
        "400": {"description": "Malformed payment header or request body.", **error},
        "402": {
            "description": (
                f"Payment required: {price['amount'] + ' ' + tool.payment.asset_name if 'amount' in price else price['priceText']} on "
                f"{tool.payment.network}. Sign the offer in PAYMENT-REQUIRED and resend as PAYMENT-SIGNATURE."
            ),
            "headers": {"PAYMENT-REQUIRED": {"$ref": "#/components/headers/PAYMENT-REQUIRED"}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PaymentRequired"}}},
        },
        **({"401": {"description": "The user's access token is missing, expired or not valid for this tool; "
                           "no offer is made.", **error},
            "403": {"description": "The user's access token lacks a scope (missingScopes).", **error}}
           if tool.user_auth is not None else {}),
        "409": {"description": "The payment is in flight, already used, or its payment-identifier conflicts.", **error},
        "422": {"description": "The arguments do not match the input schema; nothing is charged.", **error},
        "503": {"description": "Settlement, facilitator or ledger unavailable or pending; see retryAfter.", **error},
        "default": {"description": "Any other refusal, with a code and the next step.", **error},
    }
    return spec


def openapi_document(
    tools: list[Tool], catalog_descriptions: list[str], base: str, price: Callable[[Tool], dict[str, Any]]
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for tool in tools:
        paths.setdefault(tool.path, {})[tool.method.lower()] = operation(tool, price(tool))
    descriptions = catalog_descriptions
    document: dict[str, Any] = {
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
    users = {scheme_name(tool): security_scheme(tool) for tool in tools if tool.user_auth is not None}
    if users:  # a copy: COMPONENTS is shared
        document["components"] = {**COMPONENTS, "securitySchemes": {**COMPONENTS["securitySchemes"], **users}}
    return document


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
