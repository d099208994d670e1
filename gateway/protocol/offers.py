"""Offers: the x402 payment requirements of each tool, computed once at catalog load.

A 402 challenge and the binding check read the same precomputed ``PaymentRequirements``; per
request only ``extra.requestBinding`` is added: a digest of method, path and query, so a payment
made for one route or query is refused on another even when the price is the same.

A tool with several offers (``Tool.alternatives``: another token, chain or scheme) lists every one
in ``accepts``, the catalog's ``payment`` first; the payer picks one, and ``Quote.chosen`` is the
quote of that one: its requirements and the tool as paid with it (``Tool.paid_with``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
# ``required`` (X402GW_PAYMENT_IDENTIFIER=required): every payment must carry one, so every stored
# answer replays only to its payer's own id, never to a payload rebuilt from the chain.
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
PAYMENT_IDENTIFIER_REQUIRED_EXTENSION: dict[str, Any] = {**PAYMENT_IDENTIFIER_EXTENSION, "info": {"required": True}}


MAX_RESOURCE_URL = 2048  # ResourceInfo.url's limit: longer ones take the validating path


def request_binding(method: str, path: str, query: str) -> str:
    """Digest of what is being bought. HEAD is bound as GET (it is answered with GET's offer).
    The query's keys in any order, but a repeated key's values in theirs: ``?tag=a&tag=b`` is the
    array ``[a, b]`` upstream, not ``[b, a]`` (a stable sort by key alone)."""
    verb = "GET" if method == "HEAD" else method
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    canonical_query = urlencode(sorted(pairs, key=lambda pair: pair[0])) if query else ""
    return hashlib.sha256(f"{verb} {path}?{canonical_query}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Offer:
    tool: Tool
    requirements: PaymentRequirements  # the first offer (the catalog's payment), without the per-request binding
    extensions: dict[str, Any]  # of every challenge: payment-identifier, bazaar (discovery)
    # The tool's further offers (``Tool.alternatives``, in order), each as its scheme asks for it.
    alternatives: tuple[PaymentRequirements, ...] = ()
    _template: dict[str, Any] = field(init=False, repr=False, compare=False)
    # The tool as paid with each offer, in the order of ``options`` (``Tool.paid_with``).
    _tools: tuple[Tool, ...] = field(init=False, repr=False, compare=False)

    @classmethod
    def for_tool(
        cls, tool: Tool, requirements: PaymentRequirements | None = None,
        alternatives: Sequence[PaymentRequirements] | None = None, *, identifier_required: bool = False,
    ) -> Offer:
        """``requirements`` (and ``alternatives``, one per ``tool.alternatives``): what the tool's
        scheme asks for each offer (``Schemes.requirements``); exact's by default.
        ``identifier_required``: the payment-identifier extension is declared required."""
        if requirements is None:
            requirements = exact_requirements(tool.payment, tool.price_atomic)
        if alternatives is None:
            alternatives = [exact_requirements(o.terms, o.price_atomic) for o in tool.alternatives]
        if len(alternatives) != len(tool.alternatives):
            raise ValueError(f"{tool.name} has {len(tool.alternatives)} further offers, got {len(alternatives)} requirements")
        identifier = PAYMENT_IDENTIFIER_REQUIRED_EXTENSION if identifier_required else PAYMENT_IDENTIFIER_EXTENSION
        extensions = {PAYMENT_IDENTIFIER: identifier, BAZAAR: bazaar_extension(tool)}
        return cls(tool=tool, requirements=requirements, extensions=extensions, alternatives=tuple(alternatives))

    def __post_init__(self) -> None:
        # The v2 challenge body without the per-request parts (error, resource URL, binding).
        template = payment_required(self, self.requirements, "", "").to_wire()
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_tools", (self.tool, *(self.tool.paid_with(o) for o in self.tool.alternatives)))

    @property
    def identifier_required(self) -> bool:
        """Every payment must carry a payment-identifier (the extension is declared required)."""
        return self.extensions.get(PAYMENT_IDENTIFIER) is PAYMENT_IDENTIFIER_REQUIRED_EXTENSION

    @property
    def options(self) -> tuple[PaymentRequirements, ...]:
        """Every offer's requirements, as ``accepts`` lists them: the first offer first."""
        return (self.requirements, *self.alternatives)

    def tool_for(self, index: int) -> Tool:
        """The tool as paid with offer ``index`` of ``options``."""
        return self._tools[index]

    def challenge_body(self, binding: str, resource_url: str, error: str) -> dict[str, Any]:
        """``payment_required(self, self.bound(binding), resource_url, error).to_wire()``, from the template."""
        template = self._template
        return {
            **template,
            "error": error,
            "resource": {**template["resource"], "url": resource_url},
            "accepts": [{**accepted, "extra": {**accepted["extra"], BINDING_KEY: binding}} for accepted in template["accepts"]],
        }

    def bound(self, binding: str, index: int = 0) -> PaymentRequirements:
        """Offer ``index`` of ``options`` bound to one request."""
        requirements = self.options[index]
        return requirements.model_copy(update={"extra": {**(requirements.extra or {}), BINDING_KEY: binding}})

    def accepts(self, requirements: PaymentRequirements, index: int = 0) -> list[PaymentRequirements]:
        """Every offer, in order, with ``requirements`` as offer ``index`` and the others bound
        like it (the same ``extra.requestBinding``, or none)."""
        if not self.alternatives:
            return [requirements]
        binding = (requirements.extra or {}).get(BINDING_KEY)
        return [
            requirements if i == index else (self.bound(binding, i) if isinstance(binding, str) else option)
            for i, option in enumerate(self.options)
        ]


def payment_required(
    offer: Offer, requirements: PaymentRequirements, resource_url: str, error: str, index: int = 0
) -> PaymentRequired:
    """The v2 402 body: ``requirements`` is offer ``index``, the others are listed beside it."""
    return PaymentRequired(
        error=error,
        resource=ResourceInfo(url=resource_url, description=offer.tool.description, mime_type="application/json"),
        accepts=offer.accepts(requirements, index),
        extensions=offer.extensions,
    )


def payment_required_v1(
    offer: Offer, requirements: PaymentRequirements, resource_url: str, error: str, index: int = 0
) -> PaymentRequiredV1:
    return PaymentRequiredV1(
        error=error,
        accepts=[
            PaymentRequirementsV1(
                scheme=option.scheme,
                network=to_legacy(option.network),
                max_amount_required=option.amount,
                asset=option.asset,
                pay_to=option.pay_to,
                resource=resource_url,
                description=offer.tool.description,
                mime_type="application/json",
                max_timeout_seconds=option.max_timeout_seconds,
                extra=option.extra,
            )
            for option in offer.accepts(requirements, index)
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
    requirements: PaymentRequirements  # of the offer the payer chose (``index``); the first until then
    resource_url: str
    version: int = 2
    binding: str | None = None  # set when ``requirements`` is ``offer.bound(binding, index)``: the fast path
    index: int = 0  # which of ``offer.options`` ``requirements`` is

    @property
    def tool(self) -> Tool:
        """The tool as paid with this quote's offer (its terms and price)."""
        return self.offer.tool_for(self.index)

    def chosen(self, index: int) -> Quote:
        """This request's quote for offer ``index`` (the payer's choice); every 402 still lists all."""
        if index == self.index:
            return self
        binding = self.binding if self.binding is not None else (self.requirements.extra or {}).get(BINDING_KEY)
        requirements = self.offer.bound(binding, index) if isinstance(binding, str) else self.offer.options[index]
        return replace(self, requirements=requirements, index=index)

    def challenge(self, error: str, extensions: dict[str, Any] | None = None) -> tuple[dict[str, str], dict[str, object]]:
        """Headers and body of a 402. The header is always v2, so a v2 client is never pushed down.
        ``extensions``: this 402's own, beside the offer's (a sign-in challenge: fresh each time)."""
        if self.version != 1 and self.binding is not None and len(self.resource_url) <= MAX_RESOURCE_URL:
            body = self.offer.challenge_body(self.binding, self.resource_url, error)
            if extensions:
                body["extensions"] = {**body.get("extensions", {}), **extensions}
            return {PAYMENT_REQUIRED: encode_header(body)}, body
        required = payment_required(self.offer, self.requirements, self.resource_url, error, self.index)
        if extensions:
            required = required.model_copy(update={"extensions": {**(required.extensions or {}), **extensions}})
        headers = {PAYMENT_REQUIRED: challenge_header(required)}
        if self.version == 1:
            v1 = payment_required_v1(self.offer, self.requirements, self.resource_url, error, self.index)
            return headers, v1.to_wire()
        return headers, required.to_wire()
