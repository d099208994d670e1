"""Offers: the x402 payment requirements of each tool, computed once at catalog load.

A 402 challenge and the binding check both read the same precomputed ``PaymentRequirements``,
so what the gateway advertises and what it accepts cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog import Tool
from settlement.codec import encode_header
from settlement.wire import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo


@dataclass(frozen=True, slots=True)
class Offer:
    tool: Tool
    requirements: PaymentRequirements

    @classmethod
    def for_tool(cls, tool: Tool) -> Offer:
        terms = tool.payment
        requirements = PaymentRequirements(
            scheme="exact",
            network=terms.network,
            amount=str(tool.price_atomic),
            asset=terms.asset,
            pay_to=terms.pay_to,
            max_timeout_seconds=terms.max_timeout_seconds,
            extra={"name": terms.asset_name, "version": terms.asset_version},
        )
        return cls(tool=tool, requirements=requirements)

    def payment_required(self, resource_url: str, error: str) -> PaymentRequired:
        return PaymentRequired(
            error=error,
            resource=ResourceInfo(url=resource_url, description=self.tool.description, mime_type="application/json"),
            accepts=[self.requirements],
        )

    def matches(self, payload: PaymentPayload) -> str | None:
        """None when ``accepted`` is exactly this offer; else the first field that differs."""
        accepted, ours = payload.accepted, self.requirements
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
