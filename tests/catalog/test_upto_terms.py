"""A tool in the upto scheme (catalog.upto): ``payment: {scheme: upto}`` and a max_price, the maximum
the payer signs for; none is ``upto_needs_max_price`` at the tool's line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from catalog import CatalogError, parse_catalog

USDC = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"


def catalog(tool_extra: str, catalog_extra: str = "", scheme_line: str = "") -> str:
    return f"""catalog: 1
owner: acme
{catalog_extra}payment:
  network: "eip155:31337"
  asset: "{USDC}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{PAY_TO}"
{scheme_line}upstreams:
  u: {{base_url: "http://127.0.0.1:9"}}
tools:
  - name: a
    description: d
    method: GET
    path: /a
    price: 0.002
{tool_extra}"""


def test_a_tool_declares_upto_with_its_maximum() -> None:
    [tool] = parse_catalog(catalog("    max_price: 0.01\n    payment: {scheme: upto}\n")).tools
    assert tool.payment.scheme == "upto" and tool.payment.maximum == Decimal("0.01") and tool.price == Decimal("0.002")


def test_the_catalogs_scheme_and_ceiling_serve_every_tool() -> None:
    [tool] = parse_catalog(catalog("", catalog_extra="max_price: 0.05\n", scheme_line="  scheme: upto\n")).tools
    assert tool.payment.scheme == "upto" and tool.payment.maximum == Decimal("0.05")


def test_exact_tools_have_no_maximum() -> None:
    [tool] = parse_catalog(catalog("    max_price: 0.01\n")).tools
    assert tool.payment.scheme == "exact" and tool.payment.maximum is None


def test_upto_without_a_max_price_is_refused_at_the_tool() -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog("    payment: {scheme: upto}\n"))
    assert [(i.path, i.code) for i in error.value.issues] == [("tools[0].max_price", "upto_needs_max_price")]


def test_a_price_above_the_maximum_is_refused() -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog("    max_price: 0.001\n    payment: {scheme: upto}\n"))
    assert "price_above_max" in [i.code for i in error.value.issues]
