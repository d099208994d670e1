"""Every offer of a tool as the discovery formats show it, and a price (one amount, or a rule): a tool with several ways to pay (another
token, chain or scheme; ``catalog.offers``) lists all of them, the catalog's ``payment`` first, in
``offers`` beside the first offer's usual fields. A single-offer tool's documents are unchanged."""

from __future__ import annotations

from typing import Any

from catalog import PaymentTerms, Tool, format_amount

__all__ = ["offer_prices", "price_facts", "upto_facts"]


def price_facts(tool: Tool, terms: PaymentTerms, price_atomic: int) -> dict[str, Any]:
    """A fixed price's ``amount`` and ``atomic``; or, for a tool priced by a rule (``catalog.price_rules``),
    no single amount but the rule (``priceRule``, amounts in ``terms``' token) and ``priceText``, a
    sentence: each call's amount is the rule's result for its arguments, stated in its 402."""
    rule = tool.price_rule
    if rule is None:
        facts: dict[str, Any] = {"amount": format_amount(price_atomic, terms.decimals), "atomic": str(price_atomic)}
    else:
        facts = {
            "priceRule": rule.describe(terms.decimals),
            "priceText": f"{rule.sentence(terms.asset_name)}, computed from the arguments; the 402 states the amount",
        }
    # A token without EIP-3009 is paid through Permit2 (catalog: asset_transfer_method), as the 402 says.
    method = {"assetTransferMethod": "permit2"} if terms.asset_transfer_method == "permit2" else {}
    return {**facts, **method, **upto_facts(terms, tool)}


def upto_facts(terms: PaymentTerms, tool: Tool | None = None) -> dict[str, Any]:
    """An ``upto`` offer (``catalog.upto``): the maximum the payer signs for and how the charge is
    computed (the price, or the usage rule's count of the answer priced per unit: ``catalog.usage``;
    never more than the maximum; the 402's ``extra.charge`` states it)."""
    if terms.scheme != "upto" or terms.maximum is None:
        return {}
    usage = tool.usage if tool is not None else None
    if usage is None:
        return {
            "maximum": f"{terms.maximum:f}",
            "chargeText": f"upto: you sign for at most {terms.maximum:f} {terms.asset_name}; the price above is charged, "
                          "never more (the 402's extra.charge states it)",
        }
    assert tool is not None
    return {
        "maximum": f"{terms.maximum:f}",
        "usage": usage.describe(tool.price),
        "chargeText": f"upto: you sign for at most {terms.maximum:f} {terms.asset_name}; charged the price above per unit "
                      f"of usage ({usage.source}{' ' + (usage.header or usage.json_pointer or '') if usage.source not in ('events', 'bytes') else ''}"
                      f"{f', per {usage.per_units} units' if usage.per_units != 1 else ''}"
                      f"{f', plus {usage.base:f}' if usage.base is not None else ''}), never more than the maximum; "
                      "the settlement's extra.charge states the units and the amount",
    }


def offer_prices(tool: Tool) -> list[dict[str, Any]]:
    """Each offer's price and terms, in order: what a payer may pick from in the 402's ``accepts``."""
    return [
        {
            **price_facts(tool, offer.terms, offer.price_atomic),
            "asset": offer.terms.asset,
            "assetName": offer.terms.asset_name,
            "decimals": offer.terms.decimals,
            "network": offer.terms.network,
            "payTo": offer.terms.pay_to,
            "scheme": offer.terms.scheme,
        }
        for offer in tool.offers
    ]
