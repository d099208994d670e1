"""Effective payment terms: the catalog's ``payment:`` block with a tool's own on top, its network
name and stablecoin symbol resolved against ``catalog.registry``, the facts of a known asset
filled in, and what a price in dollars needs.

Codes: ``unknown_asset`` (a symbol the registry does not know on that network),
``asset_mismatch`` (facts written beside a known asset that are not its facts), ``missing_key``
(an address the registry does not know, without its asset_name/asset_version/decimals),
``dollar_price_not_usd`` (a ``"$..."`` price on an asset not pegged to the dollar, or one the
registry does not know).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from catalog.documents import CatalogPaymentDoc, PaymentDoc
from catalog.fields import Dollars
from catalog.models import PaymentTerms
from catalog.registry import Stablecoin, find_network, stablecoin, stablecoin_at

__all__ = ["FACTS", "Problem", "TermsResolver", "dollar_problem"]

FACTS = ("asset_name", "asset_version", "decimals")

Problem = tuple[str, str, str]  # (field, code, message): the field is placed by the caller


def _coin_facts(coin: Stablecoin) -> dict[str, Any]:
    return {"asset_name": coin.name, "asset_version": coin.version, "decimals": coin.decimals}


def _known_symbols(network: str, local: Mapping[str, Iterable[Stablecoin]] | None) -> str:
    info = find_network(network)
    coins = list(local[network]) if local is not None and network in local else list(info.stablecoins if info else ())
    where = f"{network} ({info.title})" if info is not None else network
    if not coins:
        return f"the registry knows no stablecoin on {where}"
    return f"known on {where}: {', '.join(c.symbol for c in coins)}"


class TermsResolver:
    """Resolves the terms of one catalog's tools; tools with the same own block share one result
    (most have none and share the catalog's)."""

    def __init__(self, defaults: CatalogPaymentDoc, local: Mapping[str, Iterable[Stablecoin]] | None = None) -> None:
        self._defaults = defaults.model_dump(exclude_none=True)
        self._local = local
        self._cache: dict[tuple[tuple[str, Any], ...], tuple[PaymentTerms | None, Stablecoin | None, list[Problem]]] = {}

    def resolve(self, own: PaymentDoc | None = None) -> tuple[PaymentTerms | None, Stablecoin | None, list[Problem]]:
        """The terms (None when there are problems), the registry's stablecoin they name (None: an
        asset the registry does not know) and the problems, each naming its field."""
        overrides = tuple(own.model_dump(exclude_none=True).items()) if own is not None else ()
        found = self._cache.get(overrides)
        if found is None:
            found = self._cache[overrides] = self._resolve({**self._defaults, **dict(overrides)})
        return found

    def _resolve(self, merged: dict[str, Any]) -> tuple[PaymentTerms | None, Stablecoin | None, list[Problem]]:
        network, asset = merged["network"], merged["asset"]
        problems: list[Problem] = []
        info = find_network(network)
        if not asset.startswith("0x"):
            coin = stablecoin(network, asset, self._local)
            if coin is None:
                return None, None, [("asset", "unknown_asset",
                                     f"{asset} is not a stablecoin the registry knows on {network}; "
                                     f"{_known_symbols(network, self._local)}; or write the token's address "
                                     "with asset_name, asset_version and decimals")]
            checked = True
        else:
            coin = stablecoin_at(network, asset, self._local)
            # The local chain's entries are defaults (tests deploy all kinds of tokens there).
            checked = not (info is not None and info.local)
        if coin is not None:
            for key, value in _coin_facts(coin).items():
                if checked and key in merged and merged[key] != value:
                    problems.append((key, "asset_mismatch",
                                     f"{key} {merged[key]!r} is not that of {coin.symbol} at {coin.address} on {network} "
                                     f"({value!r}); leave it out and the registry fills it in"))
                merged.setdefault(key, value)
            merged["asset"] = coin.address
            merged.setdefault("usd_pegged", coin.currency == "USD")  # budgets count it in dollars
        for key in FACTS:
            # A token paid through Permit2 may have no EIP-712 domain, so no version to give.
            if key == "asset_version" and merged.get("asset_transfer_method") == "permit2":
                continue
            if key not in merged:
                problems.append((key, "missing_key",
                                 f"required key {key!r} is missing (the registry does not know asset {asset} on {network})"))
        if problems:
            return None, coin, problems
        try:
            return PaymentTerms(**merged), coin, []
        except ValidationError as exc:  # a fact of the registry's own that the model refuses: a bug
            return None, coin, [("asset", "invalid_value", f"the registry's facts do not validate: {exc}")]


def dollar_problem(price: Decimal, terms: PaymentTerms, coin: Stablecoin | None) -> str | None:
    """Why a price in dollars cannot be charged in this asset, or None (also for a token amount)."""
    if not isinstance(price, Dollars):
        return None
    if coin is None:
        return (f"a price in dollars needs a dollar stablecoin the registry knows; {terms.asset} on {terms.network} "
                "is not one: write the price as a token amount (price: \"0.01\")")
    if coin.currency != "USD":
        return (f"a price in dollars needs a dollar stablecoin; {coin.symbol} on {terms.network} is pegged to "
                f"{coin.currency}: write the price as a token amount (price: \"0.01\" is 0.01 {coin.symbol})")
    return None
