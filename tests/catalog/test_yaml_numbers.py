"""Numbers in a catalog are decimal, as YAML 1.2 and every reader of the file expects: YAML 1.1's
other forms (``1:30`` sexagesimal = 90, ``017`` octal = 15, ``0x1F``, ``0b101``) are text, so a price written ``1:30`` is refused as no price instead of selling the call for 90."""

from __future__ import annotations

from decimal import Decimal

import pytest

from catalog import parse_catalog
from tests.catalog.test_loader import BASE, issues


@pytest.mark.parametrize("written", ["1:30", "1:30.5", "0x1F", "0b101"])
def test_a_yaml_1_1_number_is_no_price(written: str) -> None:
    found = issues(BASE.replace("    price: 0.002\n", f"    price: {written}\n"))
    assert [(i.path, i.code) for i in found] == [("tools[0].price", "invalid_price")], found


def test_a_leading_zero_is_decimal_not_octal() -> None:
    tool = parse_catalog(BASE.replace("    price: 0.002\n", "    price: 017\n")).tools[0]
    assert tool.price == Decimal(17)  # YAML 1.1 read it as octal: 15
