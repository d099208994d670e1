"""Several offers per tool in the catalog (catalog.offers): the syntax, what each offer inherits,
and the refusals at file:line; a single-offer catalog loads as before."""

from __future__ import annotations

import pytest

from catalog import CatalogError, load_catalogs, parse_catalog
from gateway.settings import DEFAULT_CATALOG

USDC = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER = "0x1111111111111111111111111111111111111111"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"


def catalog(offers: str = "", tool_extra: str = "", price: str = '"0.002"') -> str:
    return f"""catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "{USDC}"
  pay_to: "{PAY_TO}"
{offers}upstreams:
  u: {{base_url: "http://127.0.0.1:9"}}
tools:
  - name: a
    description: d
    method: GET
    path: /a
    price: {price}
{tool_extra}"""


OTHER_PEGGED = f'  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 18, usd_pegged: true}}\n'


def test_a_single_offer_catalog_has_no_alternatives() -> None:
    for tool in load_catalogs([DEFAULT_CATALOG]).tools:
        assert tool.alternatives == () and len(tool.offers) == 1 and tool.paid_with(tool.offers[0]) is tool


def test_owner_offers_apply_to_every_tool_and_inherit_the_tool_terms() -> None:
    [tool] = parse_catalog(catalog("offers:\n" + OTHER_PEGGED)).tools
    first, second = tool.offers
    assert (first.terms.asset, first.price_atomic) == (USDC, 2000)
    assert first.terms.usd_pegged  # the registry's local USDC is a dollar coin
    assert (second.terms.asset, second.terms.network, second.terms.pay_to) == (OTHER, "eip155:31337", PAY_TO)
    assert (second.terms.decimals, second.price_atomic) == (18, 2 * 10**15)  # the same dollars, in its decimals
    paid = tool.paid_with(second)
    assert (paid.payment, paid.price, paid.name) == (second.terms, second.price, "a")


def test_a_tool_replaces_the_owner_offers_and_an_empty_list_means_none() -> None:
    own = '    offers: [{asset: "' + OTHER + '", asset_name: Two, asset_version: "1", decimals: 6, price: "0.5"}]\n'
    [tool] = parse_catalog(catalog("offers:\n" + OTHER_PEGGED, own)).tools
    assert [(o.terms.decimals, o.price_atomic) for o in tool.offers[1:]] == [(6, 500_000)]
    [tool] = parse_catalog(catalog("offers:\n" + OTHER_PEGGED, "    offers: []\n")).tools
    assert tool.alternatives == ()


def test_a_dollar_price_applies_to_every_dollar_offer() -> None:
    [tool] = parse_catalog(catalog("offers:\n" + OTHER_PEGGED, price='"$0.01"')).tools
    assert [o.price_atomic for o in tool.offers] == [10_000, 10**16]


@pytest.mark.parametrize(("offers", "code", "where"), [
    # a token amount of USDC cannot be the price of a token that is not a dollar coin
    (f'  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 6}}\n', "offer_price_required", "offers[0]"),
    # the same offer twice
    (f'  - {{asset: "{USDC}", price: "0.002"}}\n', "duplicate_offer", "offers[0]"),
    # facts are never inherited from another asset
    (f'  - {{asset: "{OTHER}", price: "0.001"}}\n', "missing_key", "offers[0].asset_name"),
    # more digits than the token has
    (f'  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 2, price: "0.001"}}\n',
     "price_precision", "offers[0].price"),
])
def test_bad_offers_are_reported_at_their_line(offers: str, code: str, where: str) -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog("offers:\n" + offers))
    issue = next(i for i in error.value.issues if i.code == code)
    assert issue.path == where and issue.line == 8
