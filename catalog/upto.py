"""A tool paid in the x402 ``upto`` scheme: the payer signs for at most a maximum, the gateway charges
the actual amount (the tool's price, or what the call used: ``catalog.usage``) and never more.

Declared with ``payment: {scheme: upto}`` (the tool's or the catalog's, or one of its ``offers``) and
a ``max_price`` (the tool's, else the catalog's): that ceiling, already the most a price may be, is
the maximum the offer asks the payer to sign. Without one the tool is refused at load
(``upto_needs_max_price``).
"""

from __future__ import annotations

from decimal import Decimal

from catalog.models import PaymentOffer, PaymentTerms

__all__ = ["UPTO", "upto_offers", "upto_terms"]

UPTO = "upto"


def upto_terms(
    terms: PaymentTerms, tool_max: Decimal | None, catalog_max: Decimal | None
) -> tuple[PaymentTerms, str | None]:
    """The terms with their ``maximum`` set for an upto tool, and a problem message when it has none."""
    if terms.scheme != UPTO:
        return terms, None
    maximum = tool_max if tool_max is not None else catalog_max
    if maximum is None:
        return terms, "scheme upto needs max_price (the tool's or the catalog's): the most a payer signs for"
    return terms.model_copy(update={"maximum": maximum}), None


def upto_offers(
    offers: tuple[PaymentOffer, ...], tool_max: Decimal | None, catalog_max: Decimal | None
) -> tuple[tuple[PaymentOffer, ...], list[tuple[int, str]]]:
    """A tool's further offers with each upto one's ``maximum`` set (the same ``max_price`` as its
    first offer, in that offer's token), and ``(index, message)`` for those that have none."""
    made: list[PaymentOffer] = []
    missing: list[tuple[int, str]] = []
    for index, offer in enumerate(offers):
        terms, problem = upto_terms(offer.terms, tool_max, catalog_max)
        if problem is not None:
            missing.append((index, problem))
        made.append(offer if terms is offer.terms else PaymentOffer.model_construct(terms=terms, price=offer.price))
    return tuple(made), missing
