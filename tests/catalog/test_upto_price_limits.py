"""An upto tool's costs at load (catalog.price_rules.ceiling_problems, catalog.reaccess): a price rule
whose highest price, where the input schema bounds the count, is above max_price (the most the payer
signs for) is refused at the price's line, as a fixed price is; an unbounded count is left to the
request (422 price_out_of_range, gateway.pipeline.compiled). ``match: tool`` re-access is refused
on a tool whose every call has its own cost (a usage rule, a price rule)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from catalog import CatalogError, parse_catalog
from catalog.price_rules import PriceRule, PriceTier, highest_price
from tests.support.catalog_text import one_tool_catalog

UPTO = '    max_price: "0.005"\n    payment: {scheme: upto}\n'


def ruled(rule: str, schema: str, extra: str = UPTO) -> str:
    """Tool ``a`` priced by ``rule`` over the argument ``n`` of ``schema``."""
    text = one_tool_catalog(extra + f"    input_schema: {{type: object, properties: {{n: {schema}}}, required: [n]}}\n")
    return text.replace('price: "0.002"', f"price: {rule}")


def issues(text: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(CatalogError) as raised:
        parse_catalog(text, "tools.yaml")
    return [(i.code, i.path, i.line) for i in raised.value.issues]


@pytest.mark.parametrize(("rule", "schema"), [
    ('{per: n, each: "0.001"}', "{type: integer, minimum: 0}"),  # unbounded: refused per request
    ('{per: n, each: "0.001"}', "{type: integer, minimum: 0, maximum: 5}"),  # at most 0.005
    ('{per: n, each: "0.001"}', "{type: array, maxItems: 5}"),
    ('{per: n, tiers: [{up_to: 3, price: "0.002"}, {price: "0.005"}]}', "{type: integer, minimum: 0}"),
    ('{per: n, tiers: [{up_to: 3, price: "0.002"}, {price: "0.009"}]}', "{type: integer, minimum: 0, maximum: 3}"),
])
def test_rules_that_stay_within_the_maximum_or_cannot_tell_load(rule: str, schema: str) -> None:
    [tool] = parse_catalog(ruled(rule, schema)).tools
    assert tool.price_rule is not None and tool.payment.maximum == Decimal("0.005")


@pytest.mark.parametrize(("rule", "schema"), [
    ('{per: n, each: "0.001"}', "{type: integer, minimum: 0, maximum: 9}"),
    ('{per: n, each: "0.001"}', "{type: integer, minimum: 0, exclusiveMaximum: 7}"),
    ('{per: n, each: "0.001"}', "{type: array, maxItems: 6}"),
    ('{base: "0.001", per: n, each: "0.001"}', "{type: integer, minimum: 0, maximum: 5}"),
    ('{per: n, tiers: [{up_to: 3, price: "0.002"}, {price: "0.009"}]}', "{type: integer, minimum: 0}"),
])
def test_a_rule_priced_above_the_maximum_is_refused_at_its_line(rule: str, schema: str) -> None:
    text = ruled(rule, schema)
    [(code, path, line)] = issues(text)
    assert (code, path) == ("price_above_max", "tools[0].price") and line == text.splitlines().index(f"    price: {rule}") + 1


def test_an_exact_tool_is_not_held_to_an_upto_maximum_here() -> None:
    [tool] = parse_catalog(ruled('{per: n, each: "0.001"}', "{type: integer, minimum: 0, maximum: 9}", '    max_price: "0.005"\n')).tools
    assert tool.payment.scheme == "exact"  # its per-request ceiling is the price guard's (price_above_max)


def test_the_highest_price_of_a_rule() -> None:
    each = PriceRule(per=("n", "m"), base=Decimal("0.01"), each=Decimal("0.002"))
    bounded = {"properties": {"n": {"type": "integer", "maximum": 4}, "m": {"type": "array", "maxItems": 3}}}
    assert highest_price(each, bounded) == (Decimal("0.034"), 12)
    assert highest_price(each, {"properties": {"n": {"type": "integer", "maximum": 4}, "m": {"type": "array"}}}) is None
    tiers = PriceRule(per=("n",), tiers=(PriceTier(up_to=2, price=Decimal("0.5")), PriceTier(up_to=10, price=Decimal("0.1")),
                                          PriceTier(up_to=None, price=Decimal("0.9"))))
    assert highest_price(tiers, {"properties": {"n": {"type": "integer", "maximum": 10}}}) == (Decimal("0.5"), 10)
    assert highest_price(tiers, {"properties": {"n": {"type": "integer", "maximum": 11}}}) == (Decimal("0.9"), 11)
    assert highest_price(tiers, {"properties": {"n": {"type": "integer"}}}) == (Decimal("0.9"), None)


REACCESS_TOOL = "    reaccess: {window: 1h, match: tool}\n"


@pytest.mark.parametrize("extra", [
    UPTO + "    usage: {from: json, pointer: /usage/n}\n" + REACCESS_TOOL,
    REACCESS_TOOL + '    max_price: "0.005"\n',
])
def test_match_tool_is_refused_where_every_call_has_its_own_cost(extra: str) -> None:
    text = one_tool_catalog(extra)
    if "usage" not in extra:  # an exact tool priced by its arguments
        text = ruled('{per: n, each: "0.001"}', "{type: integer, minimum: 0}", extra)
    found = issues(text)
    assert [(code, path) for code, path, _ in found] == [("reaccess_repeats_priced_calls", "tools[0].reaccess.match")]
    assert found[0][2] == text.splitlines().index(REACCESS_TOOL.rstrip("\n")) + 1


def test_match_request_stays_open_to_them() -> None:
    [metered] = parse_catalog(one_tool_catalog(UPTO + "    usage: {from: json, pointer: /usage/n}\n    reaccess: {window: 1h}\n")).tools
    [priced] = parse_catalog(ruled('{per: n, each: "0.001"}', "{type: integer, minimum: 0}", "    reaccess: {window: 1h}\n")).tools
    assert metered.reaccess is not None and priced.reaccess is not None
    assert metered.reaccess.match == priced.reaccess.match == "request"
