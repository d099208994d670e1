"""Offers: the x402 payment requirements of each tool, computed once at catalog load.

A 402 challenge and the binding check read the same precomputed ``PaymentRequirements``; per
request only ``extra.requestBinding`` is added: a digest of method, path and query, so a payment
made for one route or query is refused on another even when the price is the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from catalog import Tool
from gateway.headers import PAYMENT_REQUIRED
from gateway.protocol.bazaar import BAZAAR, bazaar_extension
from settlement.chain.networks import to_legacy
from settlement.schemes.exact import exact_requirements
from settlement.x402.codec import encode_header
from settlement.x402.wire import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
)

BINDING_KEY = "requestBinding"

# The x402 payment-identifier extension, advertised in every offer: a client may send an id that
# makes its retries idempotent (same id + same request → the stored answer, no second charge).
PAYMENT_IDENTIFIER = "payment-identifier"
PAYMENT_IDENTIFIER_EXTENSION: dict[str, Any] = {
    "info": {"required": False},
    "schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "required": {"type": "boolean"},
            "id": {"type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$"},
        },
        "required": ["required"],
    },
}


MAX_RESOURCE_URL = 2048  # ResourceInfo.url's limit: longer ones take the validating path


def request_binding(method: str, path: str, query: str) -> str:
    """Digest of what is being bought. HEAD is bound as GET (it is answered with GET's offer)."""
    verb = "GET" if method == "HEAD" else method
    canonical_query = urlencode(sorted(parse_qsl(query, keep_blank_values=True))) if query else ""
    return hashlib.sha256(f"{verb} {path}?{canonical_query}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Offer:
    tool: Tool
    requirements: PaymentRequirements  # without the per-request binding
    extensions: dict[str, Any]  # of every challenge: payment-identifier, bazaar (discovery)
    _template: dict[str, Any] = field(init=False, repr=False, compare=False)

    @classmethod
    def for_tool(cls, tool: Tool, requirements: PaymentRequirements | None = None) -> Offer:
        """``requirements``: what the tool's scheme asks for (``Schemes.requirements``); exact's by default."""
        if requirements is None:
            requirements = exact_requirements(tool.payment, tool.price_atomic)
        extensions = {PAYMENT_IDENTIFIER: PAYMENT_IDENTIFIER_EXTENSION, BAZAAR: bazaar_extension(tool)}
        return cls(tool=tool, requirements=requirements, extensions=extensions)

    def __post_init__(self) -> None:
        # The v2 challenge body without the per-request parts (error, resource URL, binding).
        template = payment_required(self, self.requirements, "", "").to_wire()
        object.__setattr__(self, "_template", template)

    def challenge_body(self, binding: str, resource_url: str, error: str) -> dict[str, Any]:
        """``payment_required(self, self.bound(binding), resource_url, error).to_wire()``, from the template."""
        template = self._template
        accepted = template["accepts"][0]
        return {
            **template,
            "error": error,
            "resource": {**template["resource"], "url": resource_url},
            "accepts": [{**accepted, "extra": {**accepted["extra"], BINDING_KEY: binding}}],
        }

    def bound(self, binding: str) -> PaymentRequirements:
        return self.requirements.model_copy(update={"extra": {**(self.requirements.extra or {}), BINDING_KEY: binding}})


def payment_required(
    offer: Offer, requirements: PaymentRequirements, resource_url: str, error: str
) -> PaymentRequired:
    return PaymentRequired(
        error=error,
        resource=ResourceInfo(url=resource_url, description=offer.tool.description, mime_type="application/json"),
        accepts=[requirements],
        extensions=offer.extensions,
    )


def payment_required_v1(offer: Offer, requirements: PaymentRequirements, resource_url: str, error: str) -> PaymentRequiredV1:
    return PaymentRequiredV1(
        error=error,
        accepts=[
            PaymentRequirementsV1(
                scheme=requirements.scheme,
                network=to_legacy(requirements.network),
                max_amount_required=requirements.amount,
                asset=requirements.asset,
                pay_to=requirements.pay_to,
                resource=resource_url,
                description=offer.tool.description,
                mime_type="application/json",
                max_timeout_seconds=requirements.max_timeout_seconds,
                extra=requirements.extra,
            )
        ],
    )


def mismatch(ours: PaymentRequirements, payload: PaymentPayload) -> str | None:
    """None when ``accepted`` is exactly our requirement; else the first field that differs."""
    accepted = payload.accepted
    for name in ("scheme", "network", "amount", "asset", "pay_to", "max_timeout_seconds"):
        if getattr(accepted, name) != getattr(ours, name):
            return name
    theirs = accepted.extra or {}
    for key, value in (ours.extra or {}).items():
        if theirs.get(key) != value:
            return f"extra.{key}"
    return None


def challenge_header(required: PaymentRequired) -> str:
    return encode_header(required)


@dataclass(frozen=True, slots=True)
class Quote:
    """One request's offer: the tool's requirements bound to this request, where it is, and the
    protocol version the client speaks (v1 clients get v1 bodies and ``X-PAYMENT-RESPONSE``)."""

    offer: Offer
    requirements: PaymentRequirements
    resource_url: str
    version: int = 2
    binding: str | None = None  # set when ``requirements`` is ``offer.bound(binding)``: the fast path

    def challenge(self, error: str) -> tuple[dict[str, str], dict[str, object]]:
        """Headers and body of a 402. The header is always v2, so a v2 client is never pushed down."""
        if self.version != 1 and self.binding is not None and len(self.resource_url) <= MAX_RESOURCE_URL:
            body = self.offer.challenge_body(self.binding, self.resource_url, error)
            return {PAYMENT_REQUIRED: encode_header(body)}, body
        required = payment_required(self.offer, self.requirements, self.resource_url, error)
        headers = {PAYMENT_REQUIRED: challenge_header(required)}
        if self.version == 1:
            return headers, payment_required_v1(self.offer, self.requirements, self.resource_url, error).to_wire()
        return headers, required.to_wire()
