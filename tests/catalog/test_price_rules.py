"""Dynamic prices (catalog.price_rules): the evaluator's exact arithmetic and refusals, and the
loader's rule syntax with its diagnostics at file:line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from catalog import CatalogError, parse_catalog
from catalog.fields import Dollars
from catalog.price_rules import PriceRule, PriceRuleError, PriceTier

USDC = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
OTHER = "0x1111111111111111111111111111111111111111"

PER_SYMBOL = PriceRule(per=("symbols",), each=Decimal("0.001"), dollars=True)
PER_PAGE = PriceRule(per=("pages",), base=Decimal("0.01"), each=Decimal("0.002"))
TIERS = PriceRule(per=("pages",), tiers=(PriceTier(up_to=10, price=Decimal("0.01")),
                                         PriceTier(up_to=100, price=Decimal("0.05")),
                                         PriceTier(up_to=None, price=Decimal("0.2"))))
BOUNDED = PriceRule(per=("pages",), tiers=(PriceTier(up_to=0, price=Decimal("0.5")), PriceTier(up_to=5, price=Decimal("1"))))


def test_per_item_counts_a_list_and_multiplies_exactly_in_each_decimals() -> None:
    assert PER_SYMBOL.atomic({"symbols": ["A"]}, 6) == 1000
    assert PER_SYMBOL.atomic({"symbols": list("ABCDEFGHIJ")}, 6) == 10_000
    assert PER_SYMBOL.atomic({"symbols": list("ABC")}, 18) == 3 * 10**15  # the same dollars in 18 decimals
    assert PER_PAGE.atomic({"pages": 7}, 6) == 10_000 + 7 * 2_000
    assert PER_PAGE.atomic({"pages": 0}, 6) == 10_000  # the base alone


def test_counts_of_several_arguments_multiply() -> None:
    rule = PriceRule(per=("items", "quantity"), each=Decimal("0.0005"))
    assert rule.atomic({"items": ["a", "b", "c"], "quantity": 4}, 6) == 12 * 500


def test_no_decimal_context_rounds_a_huge_count() -> None:
    count = 10**40 + 1  # 41 digits: Decimal's default 28-digit context would round it
    assert PER_PAGE.atomic({"pages": count}, 6) == 10_000 + 2_000 * count


def test_tiers_take_the_first_tier_that_holds_the_count() -> None:
    assert [TIERS.atomic({"pages": n}, 6) for n in (0, 10, 11, 100, 101, 10**6)] == [
        10_000, 10_000, 50_000, 50_000, 200_000, 200_000]
    with pytest.raises(PriceRuleError) as error:
        BOUNDED.atomic({"pages": 6}, 6)
    assert error.value.code == "price_out_of_range"
    assert BOUNDED.reference == Decimal("1")  # a count of 1 falls in the second tier


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None, {"n": 1}])
def test_a_count_that_is_no_whole_number_is_refused(value: object) -> None:
    with pytest.raises(PriceRuleError) as error:
        PER_PAGE.atomic({"pages": value}, 6)
    assert error.value.code == "invalid_arguments"


def test_nothing_is_sold_for_zero_nor_beyond_uint256() -> None:
    with pytest.raises(PriceRuleError) as error:
        PER_SYMBOL.atomic({"symbols": []}, 6)
    assert error.value.code == "price_out_of_range"
    with pytest.raises(PriceRuleError) as error:
        PER_PAGE.atomic({"pages": 2**256}, 6)
    assert error.value.code == "price_out_of_range"


def test_reference_description_and_sentence() -> None:
    assert PER_SYMBOL.reference == Decimal("0.001") and isinstance(PER_SYMBOL.reference, Dollars)
    assert PER_PAGE.reference == Decimal("0.012") and not isinstance(PER_PAGE.reference, Dollars)
    assert PER_SYMBOL.describe() == {"per": ["symbols"], "base": "0", "each": "0.001", "currency": "USD"}
    assert PER_PAGE.describe(6) == {"per": ["pages"], "base": "0.01", "each": "0.002"}
    assert TIERS.describe(6)["tiers"] == [{"upTo": 10, "price": "0.01"}, {"upTo": 100, "price": "0.05"},
                                          {"upTo": None, "price": "0.2"}]
    assert PER_SYMBOL.sentence("USDC") == "$0.001 per symbols"
    assert PER_PAGE.sentence("USDC") == "0.01 USDC plus 0.002 USDC per pages"
    assert TIERS.sentence("USDC") == "by pages: 0.01 USDC up to 10, 0.05 USDC up to 100, 0.2 USDC above"


# -- the catalog syntax ---------------------------------------------------------------------------

SCHEMA = """    input_schema:
      type: object
      properties:
        symbols: {type: array, items: {type: string}}
        pages: {type: integer, minimum: 0}
        loose: {type: integer}
        name: {type: string}
        maybe: {type: array}
      required: [symbols, pages, loose, name]
"""


def catalog(price: str, extra: str = "", offers: str = "", decimals: str = "") -> str:
    return f"""catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "{USDC}"
  pay_to: "{PAY_TO}"
{decimals}{offers}upstreams:
  u: {{base_url: "http://127.0.0.1:9"}}
tools:
  - name: a
    description: d
    method: POST
    path: /a
    price: {price}
{SCHEMA}{extra}"""


def test_each_syntax_loads_into_a_rule() -> None:
    [tool] = parse_catalog(catalog('{per: symbols, each: "$0.001"}')).tools
    assert tool.price_rule == PER_SYMBOL and tool.price == Decimal("0.001") and tool.price_atomic == 1000
    [tool] = parse_catalog(catalog('{base: "0.01", per: pages, each: "0.002"}')).tools
    assert tool.price_rule == PER_PAGE
    [tool] = parse_catalog(catalog("{per: [symbols, pages], each: \"0.001\"}")).tools
    assert tool.price_rule is not None and tool.price_rule.per == ("symbols", "pages")
    tiers = '\n      per: pages\n      tiers:\n        - {up_to: 10, price: "0.01"}\n        - {up_to: 100, price: "0.05"}\n        - {price: "0.2"}'
    [tool] = parse_catalog(catalog(tiers)).tools
    assert tool.price_rule == TIERS and tool.price == Decimal("0.01")


def test_a_fixed_price_has_no_rule() -> None:
    [tool] = parse_catalog(catalog('"0.002"')).tools
    assert tool.price_rule is None


def issues(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(CatalogError) as error:
        parse_catalog(text)
    return [(issue.path, issue.line, issue.code) for issue in error.value.issues]


@pytest.mark.parametrize(("price", "expected"), [
    ('{per: nope, each: "0.001"}', ("tools[0].price.per", 14, "price_unknown_argument")),
    ('{per: name, each: "0.001"}', ("tools[0].price.per", 14, "price_argument_not_count")),
    ('{per: loose, each: "0.001"}', ("tools[0].price.per", 14, "price_argument_not_count")),
    ('{per: pages, each: "0.0000001"}', ("tools[0].price.each", 14, "price_precision")),
    ('{per: pages}', ("tools[0].price", 14, "invalid_price_rule")),
    ('{per: [pages, pages], each: "0.01"}', ("tools[0].price.per", 14, "invalid_price_rule")),
    ('{per: [], each: "0.01"}', ("tools[0].price.per", 14, "invalid_price_rule")),
    ('{per: pages, each: "$0.01", base: "0.01"}', ("tools[0].price", 14, "invalid_price_rule")),
    ('{per: pages, each: "-0.01"}', ("tools[0].price.each", 14, "invalid_price")),
    ('{per: pages, each: "0.01", every: 2}', ("tools[0].price.every", 14, "unknown_key")),
    ('{per: pages, tiers: [{price: "0.1"}, {up_to: 3, price: "0.2"}]}', ("tools[0].price.tiers[0].up_to", 14, "invalid_price_rule")),
    ('{per: pages, tiers: [{up_to: 1.5, price: "0.1"}]}', ("tools[0].price.tiers[0].up_to", 14, "invalid_value")),
])
def test_a_bad_rule_is_reported_at_its_line_with_a_stable_code(price: str, expected: tuple[str, int, str]) -> None:
    assert expected in issues(catalog(price))


def test_an_optional_count_argument_is_refused() -> None:
    assert ("tools[0].price.per", 14, "price_argument_optional") in issues(catalog('{per: maybe, each: "0.001"}'))


def test_a_rule_whose_least_price_is_above_max_price_is_refused() -> None:
    found = issues(catalog('{base: "0.5", per: pages, each: "0.01"}', "    max_price: \"0.1\"\n"))
    assert ("tools[0].price", 14, "price_above_max") in found


def test_a_rule_applies_to_every_offer_in_each_token_and_needs_each_offer_precision() -> None:
    pegged = f'offers:\n  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 18, usd_pegged: true}}\n'
    [tool] = parse_catalog(catalog('{per: symbols, each: "$0.001"}', offers=pegged)).tools
    assert tool.price_rule is not None
    assert [tool.price_rule.atomic({"symbols": ["A", "B"]}, o.terms.decimals) for o in tool.offers] == [2000, 2 * 10**15]
    coarse = f'offers:\n  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 2, usd_pegged: true}}\n'
    tiered = '{per: symbols, tiers: [{up_to: 1, price: "$0.01"}, {price: "$0.005"}]}'
    assert ("tools[0].price.tiers[1].price", 16, "price_precision") in issues(catalog(tiered, offers=coarse))
    priced = f'offers:\n  - {{asset: "{OTHER}", asset_name: Two, asset_version: "1", decimals: 6, price: "0.5"}}\n'
    assert ("offers[0].price", 8, "offer_price_on_rule") in issues(catalog('{per: symbols, each: "0.001"}', offers=priced))
