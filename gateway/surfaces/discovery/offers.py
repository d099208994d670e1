"""Every offer of a tool as the discovery formats show it: a tool with several ways to pay (another
token, chain or scheme; ``catalog.offers``) lists all of them, the catalog's ``payment`` first, in
``offers`` beside the first offer's usual fields. A single-offer tool's documents are unchanged."""

from __future__ import annotations

from typing import Any

from catalog import Tool, format_amount

__all__ = ["offer_prices"]


def offer_prices(tool: Tool) -> list[dict[str, Any]]:
    """Each offer's price and terms, in order: what a payer may pick from in the 402's ``accepts``."""
    return [
        {
            "amount": format_amount(offer.price_atomic, offer.terms.decimals),
            "atomic": str(offer.price_atomic),
            "asset": offer.terms.asset,
            "assetName": offer.terms.asset_name,
            "decimals": offer.terms.decimals,
            "network": offer.terms.network,
            "payTo": offer.terms.pay_to,
            "scheme": offer.terms.scheme,
        }
        for offer in tool.offers
    ]
