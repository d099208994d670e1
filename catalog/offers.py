"""Several offers per tool: further ways to pay beside the catalog's ``payment`` (another token,
another chain, another scheme), each at its own price or at the tool's one price.

Catalog syntax (owner level: every tool without an ``offers`` of its own; tool level: that tool,
``offers: []`` for none)::

    payment: {network: base, asset: USDC, pay_to: "0x..."}   # the first offer, as before
    offers:                                                  # the others, in order
      - {asset: EURC, price: "0.0095"}                       # same network and payee, own price
      - {network: "eip155:42161", asset: USDC}               # the tool's price: both are dollars
      - asset: "0x6B17...1d0F"                               # an address the registry does not know
        asset_name: Dai Stablecoin
        asset_version: "1"
        decimals: 18
        usd_pegged: true                                     # a dollar stablecoin (budgets in dollars)
    tools:
      - name: get_quote
        price: "$0.002"                                      # one dollar price: every offer's
        offers: [{asset: USDC, network: arbitrum}]           # this tool: only these beside payment

Each offer names its ``asset`` (a symbol the registry knows on its network, or an address with
``asset_name``, ``asset_version`` and ``decimals``); its ``network``, ``pay_to``,
``max_timeout_seconds`` and ``scheme`` default to the tool's terms, and the token's facts are never
inherited from another asset. ``price`` defaults to the tool's price: a dollar price
(``"$0.01"``) on every offer of a dollar stablecoin; a token amount only on the tool's own asset,
or on dollar stablecoins when the tool's asset is one too (one dollar is one unit of each).
Otherwise the offer must say its price (``offer_price_required``). Two offers with the same
scheme, network, asset and payee are one offer written twice (``duplicate_offer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

from catalog.documents import CatalogPaymentDoc, OfferDoc, PaymentDoc
from catalog.fields import Dollars
from catalog.models import PaymentOffer, PaymentTerms
from catalog.pricing import to_atomic
from catalog.registry import Stablecoin
from catalog.terms import Problem, TermsResolver, dollar_problem

__all__ = ["OfferDoc", "resolve_offers"]


def _pegged(terms: PaymentTerms, coin: Stablecoin | None) -> bool:
    return terms.usd_pegged or (coin is not None and coin.currency == "USD")


def resolve_offers(
    base: PaymentTerms,
    price: Decimal,
    docs: Sequence[OfferDoc],
    local: Mapping[str, Iterable[Stablecoin]] | None = None,
) -> tuple[tuple[PaymentOffer, ...], list[Problem]]:
    """The further offers of a tool whose first offer is ``base`` at ``price`` (a token amount, or
    ``Dollars``), and the problems as ``(field, code, message)`` with the field under ``offers[i]``."""
    offers: list[PaymentOffer] = []
    problems: list[Problem] = []
    seen = {(base.scheme, base.network, base.asset, base.pay_to): "payment"}
    for index, doc in enumerate(docs):
        at = f"offers[{index}]"
        own = doc.model_dump(exclude_none=True, exclude={"price", "scheme", "network", "pay_to", "max_timeout_seconds"})
        defaults = CatalogPaymentDoc(
            network=doc.network or base.network, asset=doc.asset, pay_to=doc.pay_to or base.pay_to,
            max_timeout_seconds=doc.max_timeout_seconds or base.max_timeout_seconds, scheme=doc.scheme or base.scheme,
        )
        terms, coin, found = TermsResolver(defaults, local).resolve(PaymentDoc(**own))
        problems += [(f"{at}.{field}", code, message) for field, code, message in found]
        if terms is None:
            continue
        terms = terms.model_copy(update={"usd_pegged": _pegged(terms, coin) if doc.usd_pegged is None else doc.usd_pegged})
        key = (terms.scheme, terms.network, terms.asset, terms.pay_to)
        if key in seen:
            problems.append((at, "duplicate_offer",
                             f"this offer ({terms.scheme} on {terms.network}, asset {terms.asset}, to {terms.pay_to}) "
                             f"is {seen[key]} again"))
            continue
        seen[key] = at
        own_price = doc.price is not None
        amount = doc.price if doc.price is not None else price
        problem = None if terms.usd_pegged and (coin is None or coin.currency == "USD") else dollar_problem(amount, terms, coin)
        if problem is not None:
            problems.append((f"{at}.price" if own_price else at, "dollar_price_not_usd", problem))
            continue
        if not own_price and not isinstance(price, Dollars) and terms.asset != base.asset:
            if not (base.usd_pegged and terms.usd_pegged):
                problems.append((at, "offer_price_required",
                                 f"the tool's price {price:f} is an amount of {base.asset}, not of {terms.asset}; "
                                 "give this offer its own price (or mark both dollar stablecoins usd_pegged)"))
                continue
        value = Decimal(amount)
        try:
            to_atomic(value, terms.decimals)
        except ValueError:
            problems.append((f"{at}.price" if own_price else at, "price_precision",
                             f"price {value:f} has more digits than the token's {terms.decimals} decimals"))
            continue
        offers.append(PaymentOffer.model_construct(terms=terms, price=value))
    return tuple(offers), problems
