"""A tool's usage: rule and stream: flag (catalog.usage): what loads, and each refusal's code at its
line; the charge arithmetic (exact integers, rounded up, capped) and the usage values an answer may
hold (whole numbers only)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from catalog import CatalogError, parse_catalog
from catalog.usage import UsageError, UsageRule, parse_units
from tests.support.catalog_text import one_tool_catalog

UPTO = "    max_price: \"0.01\"\n    payment: {scheme: upto}\n"


def codes(extra: str) -> set[str]:
    with pytest.raises(CatalogError) as raised:
        parse_catalog(one_tool_catalog(extra))
    return {issue.code for issue in raised.value.issues}


def test_a_usage_rule_loads_on_an_upto_tool() -> None:
    [tool] = parse_catalog(one_tool_catalog(UPTO + "    usage: {from: json, pointer: /usage/n, base: \"0.001\", per_units: 10}\n")).tools
    assert tool.usage is not None and tool.usage.source == "json" and tool.usage.base == Decimal("0.001")
    assert tool.payment.maximum == Decimal("0.01")


@pytest.mark.parametrize(("extra", "code"), [
    ("    usage: {from: json, pointer: /n}\n", "usage_needs_upto"),
    (UPTO + "    settle: upfront\n    usage: {from: json, pointer: /n}\n", "usage_needs_settle_after"),
    (UPTO + "    usage: {from: header}\n", "invalid_usage_rule"),
    (UPTO + "    usage: {from: json, pointer: n}\n", "invalid_usage_rule"),
    (UPTO + "    usage: {from: json, pointer: /n, header: X-N}\n", "invalid_usage_rule"),
    (UPTO + "    usage: {from: element, element: Usage/N}\n", "invalid_usage_rule"),  # a REST tool
    (UPTO + "    usage: {from: events}\n", "usage_needs_stream"),
    (UPTO + "    stream: true\n    usage: {from: json, pointer: /n}\n", "usage_needs_stream"),
    (UPTO + "    usage: {from: json, pointer: /n, base: \"0.02\"}\n", "upto_max_below_minimum"),
    (UPTO + "    stream: true\n", "stream_needs_usage"),
    ("    stream: true\n    settle: after\n", "stream_settles_upfront"),
])
def test_each_refusal_has_its_code(extra: str, code: str) -> None:
    assert code in codes(extra)


def test_the_charge_is_exact_rounded_up_and_capped() -> None:
    rule = UsageRule.model_validate({"from": "json", "pointer": "/n", "base": "0.001", "per_units": 1000})
    charge = rule.charge(1500, price=Decimal("0.002"), decimals=6, maximum=10_000)
    assert (charge.amount, charge.capped) == (1_000 + 3_000, False)  # 0.002 per 1000 units: 1500 -> 3000
    charge = rule.charge(1, price=Decimal("0.002"), decimals=6, maximum=10_000)
    assert charge.amount == 1_000 + 2  # a part of a unit rounds up to a whole atomic unit
    capped = rule.charge(10**9, price=Decimal("0.002"), decimals=6, maximum=10_000)
    assert (capped.amount, capped.capped, capped.describe()["computed"]) == (10_000, True, str(1_000 + 2 * 10**9))


@pytest.mark.parametrize(("value", "units"), [(0, 0), (12, 12), ("12", 12), (" 7 ", 7)])
def test_whole_numbers_are_units(value: object, units: int) -> None:
    assert parse_units(value) == units


@pytest.mark.parametrize(("value", "code"), [
    (-1, "usage_negative"), ("-3", "usage_negative"), (2.5, "usage_fractional"), (Decimal("2.0"), "usage_fractional"),
    ("2.5", "usage_fractional"), ("1e3", "usage_fractional"), ("lots", "usage_not_a_number"), (True, "usage_not_a_number"),
    (None, "usage_missing"), ([1], "usage_not_a_number"), (10**60, "usage_too_large"),
])
def test_anything_else_is_refused_with_its_code(value: object, code: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_units(value)
    assert raised.value.code == code


OTHER_EXACT = ("{scheme: exact, asset: \"0x1111111111111111111111111111111111111111\", asset_name: Two, "
               "asset_version: \"1\", decimals: 6, price: \"0.001\"}")


def test_every_offer_of_a_usage_tool_is_checked_not_only_the_first() -> None:
    """An exact offer beside a usage tool's upto one sold the metered answer at one unit's price."""
    with pytest.raises(CatalogError) as raised:
        parse_catalog(one_tool_catalog(UPTO + "    usage: {from: json, pointer: /n}\n    offers: [" + OTHER_EXACT + "]\n"))
    assert any(i.code == "usage_needs_upto" and i.path.startswith("tools[0].offers[0].") for i in raised.value.issues)


def test_an_exact_offer_beside_an_upto_stream_must_settle_before_it_starts() -> None:
    with pytest.raises(CatalogError) as raised:
        parse_catalog(one_tool_catalog(UPTO + "    stream: true\n    usage: {from: events}\n    offers: [" + OTHER_EXACT + "]\n"))
    assert any(i.code == "stream_settles_upfront" and i.path.startswith("tools[0].offers[0].") for i in raised.value.issues)
